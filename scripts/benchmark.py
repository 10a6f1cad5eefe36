#!/usr/bin/env python
"""Benchmark histomim's MIM training step against transformers' own models, side by side in one run.

The same as `histomim benchmark`: `python scripts/benchmark.py --help` explains every option.
"""

import sys

from histomim.cli.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
