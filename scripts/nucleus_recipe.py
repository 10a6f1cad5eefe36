#!/usr/bin/env python
"""Pretrain the nano preset on unlabelled H&E tiles and plot its nucleus-type probe against pretraining
steps beside the random-init twin (docs/evaluation.md). `--help` explains every option."""

import sys

from histomim.evaluation.recipe import main

if __name__ == "__main__":
    sys.exit(main())
