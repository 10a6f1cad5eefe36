#!/usr/bin/env python
"""Classify slides from their tile features with ABMIL; attention heat maps and QuPath GeoJSON per slide.

The same as `histomim classify`: `python scripts/classify_slides.py --help` explains every option.
"""

import sys

from histomim.cli.classify import main

if __name__ == "__main__":
    sys.exit(main())
