"""Embed the tiles of tiled slides with a histomim encoder: one safetensors file per slide.

    histomim tile slides/ --out tiles/ --mpp 0.5
    histomim extract --model outputs/histomim-tiny-demo --tiles tiles/ --out features/

A rerun keeps the feature files made like now (same model weights, preprocessing, slide file and tiles)
and refuses, naming each, those made otherwise unless --overwrite.
"""

import argparse
from pathlib import Path

from ..features import FEATURE_FILE_FORMATS, extract_features


def parse_args(argv=None, prog=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="saved model folder or Hub id (loaded with AutoModel)")
    parser.add_argument("--tiles", required=True, type=Path,
                        help="tile manifest parquet, or the output folder of scripts/tile_slides.py")
    parser.add_argument("--out", required=True, type=Path, help="folder for <slide_id>.safetensors feature files")
    parser.add_argument("--batch-size", type=int, default=64, help="tiles per forward pass (default: %(default)s)")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes (default: %(default)s)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="resize tiles to this size instead of the model's (position embeddings are interpolated)")
    parser.add_argument("--overwrite", action="store_true",
                        help="recompute slides whose feature file exists (without it, a file made with another "
                        "model, other tiles or from another slide file is refused, one made like now is kept)")
    parser.add_argument("--format", dest="file_format", choices=FEATURE_FILE_FORMATS, default="safetensors",
                        help="feature files: safetensors, or CLAM/TRIDENT-style h5 (features, coords; needs h5py) "
                        "(default: %(default)s)")  # fmt: skip
    return parser.parse_args(argv)


def main(argv=None, prog=None) -> int:
    args = parse_args(argv, prog)
    outputs = extract_features(args.model, args.tiles, args.out, batch_size=args.batch_size,
                               num_workers=args.num_workers, device=args.device, image_size=args.image_size,
                               overwrite=args.overwrite, file_format=args.file_format)
    print(f"features of {len(outputs)} slides in {args.out}")
    return 0

