#!/usr/bin/env python
"""Cross-validate a HistoFusion survival model on a patient table (default: sksurv's breast-cancer cohort).

The same as `histomim survival`: `python scripts/train_survival.py --help` explains every option.
"""

import sys

from histomim.cli.survival import main

if __name__ == "__main__":
    sys.exit(main())
