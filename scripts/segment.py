#!/usr/bin/env python
"""Train a semantic segmentation model on image/mask pairs beside a random-init encoder; write scores and an overlay PNG.

The same as `histomim segment`: `python scripts/segment.py --help` explains every option.
"""

import sys

from histomim.cli.segment import main

if __name__ == "__main__":
    sys.exit(main())
