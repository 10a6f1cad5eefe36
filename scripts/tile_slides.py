#!/usr/bin/env python
"""Tile whole-slide images at a physical resolution into manifests (and optionally tile images).

The same as `histomim tile`: `python scripts/tile_slides.py --help` explains every option.
"""

import sys

from histomim.cli.tile import main

if __name__ == "__main__":
    sys.exit(main())
