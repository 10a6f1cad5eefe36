#!/usr/bin/env python
"""Pretrain a HistoMIM encoder with masked image modeling (MAE or SimMIM).

    python scripts/pretrain.py                       # demo: tiny ViT, MAE, tiles of the CMU-1 sample slide
    accelerate launch scripts/pretrain.py --config histomim-vitb16 --data slides/ --epochs 100 --mixed-precision bf16
    torchrun --nproc_per_node 2 scripts/pretrain.py --cpu --max-steps 50
    python scripts/pretrain.py --output-dir outputs/run --resume-from-checkpoint latest

The loop lives in histomim.training.pretrain; every flag is a field of PretrainArguments.
"""

from __future__ import annotations

import argparse
import sys

from transformers import HfArgumentParser

from histomim.training.pretrain import PretrainArguments, pretrain


def main(argv: list[str] | None = None) -> int:
    parser = HfArgumentParser(
        PretrainArguments, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    pretrain(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
