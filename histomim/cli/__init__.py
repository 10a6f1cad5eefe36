"""The ``histomim`` command: one entry point, one subcommand per job.

    histomim tile slides/ --out tiles/            # histomim.cli.tile
    histomim pretrain                             # the demo; histomim.cli.pretrain
    histomim extract --model M --tiles T --out F  # histomim.cli.extract
    histomim evaluate --model M --nuclei          # histomim.cli.evaluate
    histomim segment --model M --output-dir O     # histomim.cli.segment
    histomim classify --table T --output-dir O    # histomim.cli.classify
    histomim survival --compare-baselines         # histomim.cli.survival
    histomim benchmark --device cpu ...           # histomim.cli.benchmark
    accelerate launch -m histomim.cli pretrain --data tiles/ ...

Each subcommand is a module of this package with ``main(argv) -> int``; ``scripts/*.py`` call the
same functions. A subcommand's module is imported only when it runs, so ``histomim --help`` is fast.
"""

from __future__ import annotations

import importlib
import sys

# command -> its one-line description for `histomim --help`; the command is the module histomim.cli.<command>
SUBCOMMANDS = {
    "tile": "tile whole-slide images at a physical resolution into tile manifests",
    "pretrain": "pretrain an encoder with masked image modeling (no arguments: the demo)",
    "extract": "embed the tiles of tiled slides: one feature file per slide",
    "finetune": "fine-tune an encoder for classification: full (layer-wise lr decay) or LoRA",
    "evaluate": "linear probe, kNN and few-shot on frozen features, beside a random-init twin",
    "segment": "train a semantic segmentation model on image/mask pairs, beside a random-init encoder",
    "classify": "classify slides from tile features with ABMIL; attention heat maps and QuPath GeoJSON",
    "survival": "cross-validate a multimodal survival model on a patient table",
    "benchmark": "time histomim's training step against transformers' models",
}


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = [f"  {name:<{width}}  {description}" for name, description in SUBCOMMANDS.items()]
    return (
        "usage: histomim <command> [options]\n\n"
        "Masked image modeling for histopathology on the Hugging Face stack.\n\n"
        "commands:\n" + "\n".join(lines) + "\n\n"
        "`histomim <command> --help` explains every option of a command.\n"
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), end="")
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from .. import __version__

        print(f"histomim {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"histomim: unknown command {name!r}\n\n{usage()}", end="", file=sys.stderr)
        return 2
    module = importlib.import_module(f"{__name__}.{name}")
    return module.main(rest, prog=f"histomim {name}") or 0


__all__ = ["SUBCOMMANDS", "main"]
