#!/usr/bin/env python
"""Evaluate an encoder on frozen features (linear probe, kNN, few-shot) beside its random-init twin.

The same as `histomim evaluate`: `python scripts/evaluate.py --help` explains every option.
"""

import sys

from histomim.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
