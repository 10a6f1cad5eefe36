"""Classify slides from their tile features with ABMIL; attention heat maps and QuPath GeoJSON per slide.

    histomim classify --table slides.csv --output-dir outputs/cls                       # features + label columns
    histomim classify --table slides.parquet --tiles tiles/ --slide-column slide_id --output-dir outputs/cls

The table has one row per slide: its feature file (--features-column; `histomim extract` safetensors,
CLAM/TRIDENT h5 or .npy) and its label (--label-column). A stratified split (--test-size, --seed)
holds slides out; `SlideClassifier` is fitted on the rest and scored on them (balanced accuracy,
macro-F1, AUROC). Written to --output-dir: predictions.csv (every slide: split, label, prediction,
class probabilities), classify_summary.json (settings, split, scores) and, with --tiles (the
`histomim tile` folder or manifest the features were extracted from) and --slide-column, for every
slide found there a heat map of its tile attention over the thumbnail (<slide>_attention.png) and a
QuPath GeoJSON of tissue, tiles and attention (<slide>.geojson).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def parse_args(argv=None, prog=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", type=Path, required=True, help="CSV or parquet, one row per slide")
    parser.add_argument("--features-column", default="features", help="column of feature file paths (default: %(default)s)")
    parser.add_argument("--label-column", default="label", help="column of slide labels (default: %(default)s)")
    parser.add_argument("--slide-column", default=None, help="column of slide ids matching --tiles, for the maps")
    parser.add_argument("--tiles", type=Path, default=None,
                        help="the tile folder or manifest the features come from: draws attention maps and GeoJSON")
    parser.add_argument("--output-dir", type=Path, required=True, help="where predictions, summary and maps go")
    parser.add_argument("--test-size", type=float, default=0.3, help="share of slides held out (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and the model (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=100, help="full-batch training epochs (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default: %(default)s)")
    parser.add_argument("--hidden-size", type=int, default=64, help="ABMIL tile/bag embedding width (default: %(default)s)")
    parser.add_argument("--max-tiles", type=int, default=None, help="subsample bags to this many tiles in training")
    return parser.parse_args(argv)


def read_table(path: Path, columns: list[str]):
    import pandas as pd

    if not path.is_file():
        raise FileNotFoundError(f"slide table not found: {path}")
    table = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: no column {missing}; columns are {list(table.columns)}")
    # relative feature paths are relative to the table
    return table, [str(p if Path(p).is_absolute() else path.parent / p) for p in table[columns[0]]]


def write_maps(tiles_source: Path, slide_ids, attention, out_dir: Path) -> list[Path]:
    """Heat map + GeoJSON for every slide of ``slide_ids`` that the tile manifest holds."""
    from ..data.slides import open_slide
    from ..data.tissue import detect_tissue
    from ..features import read_tile_manifest
    from ..paths import child_path
    from ..slide_maps import save_tile_heatmap, tile_table, write_qupath_geojson

    manifest = read_tile_manifest(tiles_source)
    written = []
    for slide_id, weights in zip(slide_ids, attention):
        rows = manifest[manifest["slide_id"] == slide_id]
        if rows.empty:
            continue
        if len(rows) != len(weights):
            raise ValueError(f"slide {slide_id!r}: {len(weights)} tile features but {len(rows)} tiles in {tiles_source}")
        with open_slide(rows["path"].iloc[0]) as slide:
            tiles = tile_table(slide, rows, {"attention": weights})
            written.append(save_tile_heatmap(slide, tiles, "attention", child_path(out_dir, f"{slide_id}_attention.png", "slide id")))
            written.append(write_qupath_geojson(child_path(out_dir, f"{slide_id}.geojson", "slide id"), tiles, tissue=detect_tissue(slide)))
    return written


def main(argv=None, prog=None) -> int:
    import numpy as np
    from sklearn.model_selection import train_test_split

    from ..atomic import atomic_path
    from ..evaluation.probes import score
    from ..multimodal.slide_classifier import SlideClassifier

    args = parse_args(argv, prog)
    table, files = read_table(args.table, [args.features_column, args.label_column]
                              + ([args.slide_column] if args.slide_column else []))  # fmt: skip
    labels = table[args.label_column].to_numpy()
    indices = np.arange(len(table))
    train, test = train_test_split(indices, test_size=args.test_size, random_state=args.seed, stratify=labels)
    model = SlideClassifier(hidden_size=args.hidden_size, max_tiles=args.max_tiles, epochs=args.epochs,
                            learning_rate=args.lr, random_state=args.seed)  # fmt: skip
    model.fit([files[i] for i in train], labels[train])
    probabilities = model.predict_proba(files)  # (n_slides, n_classes)
    codes = np.searchsorted(model.classes_, labels)
    test_scores = score(codes[test], probabilities[test], len(model.classes_))

    args.output_dir.mkdir(parents=True, exist_ok=True)
    predictions = table.copy()
    predictions["split"] = np.where(np.isin(indices, test), "test", "train")
    predictions["predicted"] = model.classes_[probabilities.argmax(1)]
    for i, name in enumerate(model.classes_):
        predictions[f"probability_{name}"] = probabilities[:, i]
    with atomic_path(args.output_dir / "predictions.csv") as partial:
        predictions.to_csv(partial, index=False)
    summary = {"table": str(args.table), "classes": model.classes_.tolist(), "settings": model.get_params(),
               "split": {"method": "stratified", "seed": args.seed, "test_size": args.test_size,
                         "num_train": len(train), "num_test": len(test)},
               "loss_first_last": [model.loss_history_[0], model.loss_history_[-1]], "test": test_scores}  # fmt: skip
    with atomic_path(args.output_dir / "classify_summary.json") as partial:
        partial.write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print(f"training loss {model.loss_history_[0]:.3f} -> {model.loss_history_[-1]:.3f} over {args.epochs} epochs")
    print(f"{len(test)} held-out slides: " + ", ".join(f"{k} {v:.3f}" for k, v in test_scores.items()))
    if args.tiles is not None and args.slide_column:
        maps = write_maps(args.tiles, table[args.slide_column].astype(str).tolist(), model.predict_attention(files),
                          args.output_dir)  # fmt: skip
        print(f"{len(maps) // 2} slide(s) mapped: attention heat maps and GeoJSON in {args.output_dir}")
    return 0
