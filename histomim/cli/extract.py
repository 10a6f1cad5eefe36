"""Embed the tiles of slides with a histomim encoder: one safetensors (or h5) file per slide.

    histomim tile slides/ --out tiles/ --mpp 0.5
    histomim extract --model outputs/histomim-tiny-demo --tiles tiles/ --out features/
    histomim extract --model outputs/histomim-tiny-demo --slides slides/ --out features/   # tiled on the fly
    histomim extract --model outputs/histomim-tiny-demo --tiles tile_images/ --out features/   # <case>/*.png

--slides tiles each slide here (tissue detection, nothing written) at the encoder's resolution
(config target_mpp and image_size, or --mpp / --tile-size). A rerun keeps the feature files made like now
(same model weights, preprocessing, slide file and tiles) and refuses, naming each, those made otherwise
unless --overwrite. Several processes split the slides, each writing its own slides' files:

    accelerate launch --multi_gpu --num_processes 2 -m histomim.cli extract --model M --slides slides/ --out F/
    accelerate launch --multi_gpu --num_processes 2 -m histomim.cli extract --device cpu ...   # 2 CPU processes

(`accelerate launch --cpu` starts a single process whatever --num_processes says; torchrun works too.)
"""

import argparse
from pathlib import Path

from ..features import FEATURE_FILE_FORMATS, extract_features


def parse_args(argv=None, prog=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="saved model folder or Hub id (loaded with AutoModel)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tiles", type=Path,
                        help="tile manifest parquet, the output folder of `histomim tile`, or a folder of tile images "
                        "(one slide per subfolder, or the folder itself; features without coordinates)")  # fmt: skip
    source.add_argument("--slides", nargs="+", type=Path, metavar="SLIDE_OR_DIR",
                        help="whole-slide files and/or folders of slides, tiled on the fly (nothing written)")
    parser.add_argument("--mpp", type=float, default=None,
                        help="with --slides: tile resolution in um/px (default: the encoder's target_mpp)")
    parser.add_argument("--tile-size", type=int, default=None,
                        help="with --slides: tile size in px (default: the encoder's image_size)")
    parser.add_argument("--out", required=True, type=Path,
                        help="folder for the <slide_id>.safetensors (or .h5) feature files")
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
    args = parser.parse_args(argv)
    if args.tiles is not None and (args.mpp is not None or args.tile_size is not None):
        parser.error("--mpp and --tile-size apply to --slides; a tile manifest already fixes the tiles")
    return args


def main(argv=None, prog=None) -> int:
    from accelerate import PartialState

    args = parse_args(argv, prog)
    outputs = extract_features(args.model, args.tiles or args.slides, args.out, batch_size=args.batch_size,
                               num_workers=args.num_workers, device=args.device, image_size=args.image_size,
                               overwrite=args.overwrite, file_format=args.file_format, mpp=args.mpp,
                               tile_size=args.tile_size)  # fmt: skip
    if PartialState().is_main_process:  # extract_features returns once every process has written its slides
        print(f"features of {len(outputs)} slides in {args.out}")
    return 0

