#!/usr/bin/env python
"""Embed the tiles of slides (tiled, or tiled on the fly) with a histomim encoder: one feature file per slide.

The same as `histomim extract`: `python scripts/extract_features.py --help` explains every option.
"""

import sys

from histomim.cli.extract import main

if __name__ == "__main__":
    sys.exit(main())
