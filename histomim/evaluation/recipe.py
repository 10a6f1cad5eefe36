"""The nucleus recipe: pretrain the nano preset on unlabelled H&E tiles on a CPU, then measure the
nucleus-type probe of every checkpoint against the random-init twin (docs/evaluation.md).

    python scripts/nucleus_recipe.py --output-dir outputs/nano-nuclei --max-steps 300 \
        --figure docs/figures/nuclei_learning_curve.png

1. tiles: the three unlabelled cellseg H&E images (not the labelled patches) cut into 48 and 64 px
   tiles at half-tile stride, which the pretraining crop (scale 0.2-1) brings to the 32 px of the
   nucleus crops;
2. `histomim pretrain --config histomim-vit-nano-nuclei --data <tiles>` with a checkpoint every
   ``--checkpointing-steps``;
3. `learning_curve` on the 125 labelled nuclei: linear probe and kNN on mean-pooled features, one
   stratified split (``--seed``), step 0 being the random-init twin.

``--tune`` evaluates on the training nuclei of that split only (re-split with seed + 1), so settings
can be chosen without looking at the reported test nuclei.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PRESET = "histomim-vit-nano-nuclei"
TILE_SIZES = (48, 64)


def cut_tiles(images: list[Path], out_dir: Path, sizes=TILE_SIZES) -> int:
    """Every ``size`` px tile at half-tile stride of each image, as PNGs; returns how many (reused if present)."""
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    count = 0
    for path in images:
        with Image.open(path) as image:
            image = image.convert("RGB")
            for size in sizes:
                for top in range(0, image.height - size + 1, size // 2):
                    for left in range(0, image.width - size + 1, size // 2):
                        target = out_dir / f"{path.stem}_{size}_{left}_{top}.png"
                        if not target.exists():
                            image.crop((left, top, left + size, top + size)).save(target)
                        count += 1
    return count


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/nano-nuclei"), help="the pretraining run")
    parser.add_argument("--max-steps", type=int, default=300, help="pretraining steps (default: %(default)s)")
    parser.add_argument("--checkpointing-steps", type=int, default=100, help="a probed checkpoint every N steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="pretraining batch (default: %(default)s)")
    parser.add_argument("--base-lr", type=float, default=1.5e-3, help="pretraining base lr, x batch/256 (default: %(default)s)")
    parser.add_argument("--mask-ratio", type=float, default=None, help="override the preset's mask ratio (0.5)")
    parser.add_argument("--objective", choices=("mae", "simmim"), default=None, help="override the preset's objective (mae)")
    parser.add_argument("--seed", type=int, default=0, help="pretraining seed and the evaluation split's seed (default: %(default)s)")
    parser.add_argument("--tune", action="store_true", help="evaluate on the training nuclei only (see above)")
    parser.add_argument("--skip-pretraining", action="store_true", help="only evaluate the checkpoints already in --output-dir")
    parser.add_argument("--figure", type=Path, default=None, help="learning-curve PNG (default: <output-dir>/learning_curve.png)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from ..data.samples import sample_nuclei_pairs, sample_unlabelled_he_dir
    from ..presets import config_source
    from ..training.arguments import parse_pretrain_arguments
    from ..training.pretrain import load_model_config, pretrain
    from .data import LabelledImages, nucleus_crops, split_images
    from .harness import EvaluationSettings
    from .learning_curve import learning_curve, save_learning_curve_plot

    args = parse_args(argv)
    tiles = args.output_dir / "pretraining_tiles"
    print(f"{cut_tiles(sorted(sample_unlabelled_he_dir().glob('*.png')), tiles)} tiles in {tiles}")
    flags = ["--config", PRESET, "--data", str(tiles), "--output-dir", str(args.output_dir), "--max-steps",
             str(args.max_steps), "--batch-size", str(args.batch_size), "--base-lr", str(args.base_lr),
             "--checkpointing-steps", str(args.checkpointing_steps), "--checkpoints-total-limit", "1000",
             "--reconstruction-steps", "0", "--seed", str(args.seed), "--cpu"]  # fmt: skip
    flags += ["--mask-ratio", str(args.mask_ratio)] if args.mask_ratio else []
    flags += ["--objective", args.objective] if args.objective else []
    pretrain_args = parse_pretrain_arguments(flags)
    if not args.skip_pretraining:
        pretrain(pretrain_args)
    config = load_model_config(pretrain_args, None)

    nuclei = nucleus_crops(sample_nuclei_pairs(), crop_size=32)
    if args.tune:  # the reported split's training nuclei only, split again
        keep = split_images(nuclei, "stratified", 0.3, args.seed).train
        nuclei = LabelledImages([nuclei.images[i] for i in keep], nuclei.labels[keep], nuclei.class_names,
                                nuclei.groups[keep], nuclei.description + " (training nuclei of the reported split)")  # fmt: skip
    settings = EvaluationSettings(pooling="mean", protocols=("linear", "knn"), knn_k=10,
                                  seed=args.seed + 1 if args.tune else args.seed)  # fmt: skip
    points = learning_curve(args.output_dir, nuclei, settings, config=config)
    name = "tune" if args.tune else "report"
    figure = args.figure or args.output_dir / f"learning_curve_{name}.png"
    title = (f"{PRESET} {config.objective.upper()} mask {config.mask_ratio}: nucleus type, "
             f"{'tuning' if args.tune else 'held-out'} split (seed {settings.seed})")  # fmt: skip
    save_learning_curve_plot(points, figure, title=title)
    (args.output_dir / f"learning_curve_{name}.json").write_text(json.dumps(
        {"preset": config_source(PRESET), "pretraining": vars(pretrain_args), "data": nuclei.description,
         "settings": vars(settings), "points": points}, indent=1, default=str) + "\n")  # fmt: skip
    print(f"{'step':>6}  linear bal.acc  kNN bal.acc   (random init: linear {points[0]['random_init']['linear']['balanced_accuracy']:.3f}, "
          f"kNN {points[0]['random_init']['knn']['balanced_accuracy']:.3f}; split {points[0]['split']})")
    for point in points:
        print(f"{point['step']:>6}  {point['results']['linear']['balanced_accuracy']:.3f}           "
              f"{point['results']['knn']['balanced_accuracy']:.3f}")
    print(f"figure: {figure}")
    return 0


__all__ = ["cut_tiles", "main"]
