#!/usr/bin/env python
"""Embed the tiles of tiled slides with a histomim encoder: one safetensors file per slide.

The same as `histomim extract`: `python scripts/extract_features.py --help` explains every option.
"""

import sys

from histomim.cli.extract import main

if __name__ == "__main__":
    sys.exit(main())
