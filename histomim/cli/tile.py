"""Tile whole-slide images at a physical resolution into manifests (and optionally tile images).

    histomim tile slides/ extra.svs --out tiles/ --mpp 0.5 --tile-size 224 --workers 4

Rerunning with the same --out skips finished slides (same file, same settings); other settings, or
another file under a finished slide's id, are refused unless --overwrite. Exits non-zero if every
slide failed or a worker process died (the slide it was on is listed); other slides always finish.
"""

from __future__ import annotations

import argparse
import sys

from ..data.slides import BACKENDS, SLIDE_EXTENSIONS
from ..data.tiling import find_slides, tile_slides


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "slides", nargs="+", help=f"slide files and/or folders (searched recursively for {' '.join(SLIDE_EXTENSIONS)})"
    )
    parser.add_argument(
        "--out", required=True, help="output folder: manifests/, overlays/, manifest.parquet, errors.json, complete.json (written last)"
    )
    parser.add_argument(
        "--mpp", type=float, default=0.5, help="target resolution of the tiles in um/px (default: 0.5, i.e. 20x)"
    )
    parser.add_argument("--tile-size", type=int, default=224, help="tile side in pixels at --mpp (default: 224)")
    parser.add_argument("--overlap", type=int, default=0, help="pixels shared by neighbouring tiles (default: 0)")
    parser.add_argument(
        "--min-tissue", type=float, default=0.5,
        help="keep tiles with at least this tissue fraction, 0-1 (default: 0.5)",
    )  # fmt: skip
    parser.add_argument(
        "--max-pen-fraction", type=float, default=0.1,
        help="drop tiles with more than this share of blue, green or black marker ink, 0-1 (default: 0.1)",
    )  # fmt: skip
    parser.add_argument(
        "--min-focus", type=float, default=0.0,
        help="drop blurred tiles: minimum variance of the Laplacian of the grey tile, 0-255 scale; the "
        "manifest's focus column shows a slide's values (default: 0, keep all)",
    )  # fmt: skip
    parser.add_argument(
        "--min-brightness", type=float, default=0.0,
        help="drop tiles whose mean grey level is below this, 0-1 (default: 0)",
    )  # fmt: skip
    parser.add_argument(
        "--max-brightness", type=float, default=1.0,
        help="drop tiles whose mean grey level is above this, 0-1, e.g. 0.9 for washed-out tiles (default: 1)",
    )  # fmt: skip
    parser.add_argument("--workers", type=int, default=1, help="parallel processes over slides (default: 1)")
    parser.add_argument(
        "--save-images", action="store_true",
        help="also write tile pixels as datasets (tiles/<slide_id>/, save_to_disk)",
    )  # fmt: skip
    parser.add_argument(
        "--backend", choices=BACKENDS, default="auto",
        help="slide reader (default: auto = tiffslide, then OpenSlide, then PIL)",
    )  # fmt: skip
    parser.add_argument(
        "--mpp-override", type=float, default=None,
        help="level-0 um/px to assume for every slide, e.g. for PNGs without resolution metadata",
    )  # fmt: skip
    parser.add_argument(
        "--overwrite", action="store_true",
        help="retile what --out holds from other settings (all of it), or from another file or --mpp-override "
        "under a slide's id (that slide); slides that match are still skipped",
    )  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    report = tile_slides(
        find_slides(args.slides),
        args.out,
        mpp=args.mpp,
        tile_size=args.tile_size,
        overlap=args.overlap,
        min_tissue=args.min_tissue,
        max_pen_fraction=args.max_pen_fraction,
        min_focus=args.min_focus,
        min_brightness=args.min_brightness,
        max_brightness=args.max_brightness,
        workers=args.workers,
        save_images=args.save_images,
        mpp_override=args.mpp_override,
        backend=args.backend,
        overwrite=args.overwrite,
    )
    print(
        f"{len(report.tiled)} slides tiled, {len(report.skipped)} already done, {len(report.errors)} failed; "
        f"{len(report.manifest)} tiles in {args.out}/manifest.parquet"
    )
    for error in report.errors:
        print(f"  failed: {error['message']}", file=sys.stderr)
    return 1 if report.all_failed or report.crashed else 0

