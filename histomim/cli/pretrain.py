"""Pretrain a HistoMIM encoder with masked image modeling (MAE or SimMIM).

    histomim pretrain                                  # the demo: tiny ViT, MAE, tiles of the CMU-1 sample slide
    histomim pretrain --demo --max-steps 20            # the demo with other settings
    accelerate launch -m histomim.cli pretrain --config histomim-vitb16 --data slides/ --epochs 100 \\
        --mixed-precision bf16
    torchrun --nproc_per_node 2 scripts/pretrain.py --demo --cpu --max-steps 50
    histomim pretrain run.yaml                         # every setting from a JSON or YAML file
    histomim pretrain --output-dir outputs/run --data tiles/ --resume-from-checkpoint latest

The loop lives in histomim.training.pretrain; every flag is a field of PretrainArguments.
"""

from __future__ import annotations

import argparse

from ..training.arguments import parse_pretrain_arguments


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    from ..training.pretrain import pretrain

    args = parse_pretrain_arguments(argv, prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    pretrain(args)
    return 0


__all__ = ["main"]
