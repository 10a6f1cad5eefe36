#!/usr/bin/env python
"""Pretrain a HistoMIM encoder with masked image modeling (MAE or SimMIM).

The same as `histomim pretrain`: `python scripts/pretrain.py --help` explains every option.
"""

import sys

from histomim.cli.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
