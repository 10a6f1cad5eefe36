"""Tile slides at a physical resolution: a grid of level-0 boxes over tissue, saved as manifests.

A tile is a row ``(slide_id, path, x, y, level, read_size, tile_size, mpp, tissue_fraction, pen_fraction,
focus, brightness)``: read ``read_size`` px at pyramid ``level`` from level-0 ``(x, y)``, then resize to
``tile_size``; the last three are the tile's quality scores (`histomim.data.quality`).
Manifests hold no pixels; `histomim.data.tiles` reads tiles from the slides when training.

`tile_slides` runs over many slides and is safe to interrupt and rerun: each slide's manifest
is written atomically once the slide is finished, finished slides are skipped, and one bad
slide is recorded in ``errors.json`` without stopping the others.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..atomic import atomic_path
from .quality import check_quality_bounds, score_tiles
from .slides import SLIDE_EXTENSIONS, Slide, SlideError, open_slide
from .tissue import TissueMask, detect_tissue, require_tissue, save_tissue_overlay

MANIFEST_COLUMNS = (
    "slide_id", "path", "x", "y", "level", "read_size", "tile_size", "mpp", "tissue_fraction",
    "pen_fraction", "focus", "brightness",
)  # fmt: skip
_MANIFEST_DTYPES = {
    "slide_id": "string", "path": "string", "x": "int64", "y": "int64", "level": "int64",
    "read_size": "int64", "tile_size": "int64", "mpp": "float64", "tissue_fraction": "float64",
    "pen_fraction": "float64", "focus": "float64", "brightness": "float64",
}  # fmt: skip


@dataclass(frozen=True)
class TileGeometry:
    """How one slide is cut into tiles of ``tile_size`` px at a target resolution."""

    level: int  # pyramid level read from
    read_size: int  # px read at that level, resized to tile_size
    tile_size: int  # px of the output tile
    size0: float  # tile side in level-0 px
    stride0: float  # grid step in level-0 px
    mpp: float  # um/px of the output tile (the target, up to rounding of read_size)


def tile_geometry(slide: Slide, mpp: float, tile_size: int, overlap: int = 0) -> TileGeometry:
    """Choose level and read size for ``tile_size`` px tiles at ``mpp`` um/px, overlapping by ``overlap`` px."""
    if mpp <= 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    if tile_size < 1:
        raise ValueError(f"tile_size must be >= 1, got {tile_size}")
    if not 0 <= overlap < tile_size:
        raise ValueError(f"overlap must be in [0, tile_size={tile_size}), got {overlap}")
    # 1. level-0 px per output px; read from the coarsest level that is still at least as fine
    downsample = mpp / slide.require_mpp()
    level = slide.best_level_for_downsample(downsample)
    level_downsample = slide.level_downsamples[level]
    # 2. read the tile's footprint at that level; the resize makes up the remaining factor
    read_size = max(1, round(tile_size * downsample / level_downsample))
    size0 = read_size * level_downsample
    return TileGeometry(
        level=level,
        read_size=read_size,
        tile_size=tile_size,
        size0=size0,
        stride0=(tile_size - overlap) * size0 / tile_size,
        mpp=slide.mpp * size0 / tile_size,
    )


def tile_manifest(
    slide: Slide,
    tissue: TissueMask,
    mpp: float = 0.5,
    tile_size: int = 224,
    overlap: int = 0,
    min_tissue: float = 0.5,
    max_pen_fraction: float = 0.1,
    min_focus: float = 0.0,
    min_brightness: float = 0.0,
    max_brightness: float = 1.0,
    workers: int = 1,
    progress: bool = False,
) -> pd.DataFrame:
    """The tiles of one slide with at least ``min_tissue`` tissue, as a manifest (`MANIFEST_COLUMNS`).

    Only whole tiles are kept: a strip narrower than a tile at the right and bottom edges is left out.
    The tiles over tissue are then read (in ``workers`` threads) and scored (`histomim.data.quality`):
    kept are those with at most ``max_pen_fraction`` marker ink, a focus score (variance of the
    Laplacian) of at least ``min_focus`` and a mean brightness in ``[min_brightness, max_brightness]``.
    """
    if not 0 <= min_tissue <= 1:
        raise ValueError(f"min_tissue must be in [0, 1], got {min_tissue}")
    check_quality_bounds(max_pen_fraction, min_focus, min_brightness, max_brightness)
    geometry = tile_geometry(slide, mpp, tile_size, overlap)
    width, height = slide.dimensions

    # 1. every whole tile position on the level-0 grid
    def starts(extent: int) -> np.ndarray:
        count = math.floor((extent - geometry.size0) / geometry.stride0) + 1 if extent >= geometry.size0 else 0
        return np.floor(np.arange(count) * geometry.stride0).astype(np.int64)

    ys, xs = (grid.ravel() for grid in np.meshgrid(starts(height), starts(width), indexing="ij"))  # (N,) row-major
    # 2. keep those with enough tissue under them
    fractions = tissue.region_fractions(xs, ys, geometry.size0)  # (N,)
    keep = fractions >= min_tissue
    manifest = pd.DataFrame(
        {
            "slide_id": slide.slide_id,
            "path": str(slide.path.resolve()),
            "x": xs[keep],
            "y": ys[keep],
            "level": geometry.level,
            "read_size": geometry.read_size,
            "tile_size": geometry.tile_size,
            "mpp": geometry.mpp,
            "tissue_fraction": fractions[keep],
        }
    )
    # 3. read the tiles over tissue; drop ink, blur and tiles too dark or too bright
    manifest = score_tiles(slide, manifest, workers, progress)
    good = (
        (manifest["pen_fraction"] <= max_pen_fraction)
        & (manifest["focus"] >= min_focus)
        & manifest["brightness"].between(min_brightness, max_brightness)
    )
    return manifest[good].reset_index(drop=True).astype(_MANIFEST_DTYPES)


def find_slides(inputs: Iterable[str | Path], extensions: Iterable[str] = SLIDE_EXTENSIONS) -> list[Path]:
    """Expand files and folders (recursively) into a sorted list of slide files.

    Files are kept whatever their extension (a bad one is reported when tiled); folders contribute
    the files with a known slide extension.

    Raises:
        FileNotFoundError: an input does not exist.
        ValueError: nothing to tile.
    """
    extensions = {e.lower() for e in extensions}
    inputs = [Path(p) for p in inputs]
    found: list[Path] = []
    for path in inputs:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in extensions)
        elif path.exists():
            found.append(path)
        else:
            raise FileNotFoundError(f"slide file or folder not found: {path}")
    if not found:
        raise ValueError(f"no slides ({', '.join(sorted(extensions))}) found in {', '.join(map(str, inputs))}")
    return list(dict.fromkeys(found))  # drop repeats, keep order


# -- many slides -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TilingConfig:
    """What determines a manifest's content; a rerun into the same folder must not change it."""

    mpp: float = 0.5
    tile_size: int = 224
    overlap: int = 0
    min_tissue: float = 0.5
    max_pen_fraction: float = 0.1
    min_focus: float = 0.0
    min_brightness: float = 0.0
    max_brightness: float = 1.0

    def __post_init__(self):
        # before tiling_config.json records them: a typo must not block the corrected rerun
        check_quality_bounds(self.max_pen_fraction, self.min_focus, self.min_brightness, self.max_brightness)


@dataclass(frozen=True)
class TileFolder:
    """The output folder of `tile_slides`, and the one place where its file names are spelled::

        tiling_config.json        the settings (`TilingConfig`); a rerun with others is refused
        manifests/<slide>.parquet one per finished slide, written last (its presence means done)
        overlays/<slide>.png      thumbnail, tissue outline and tiles
        tiles/<slide>/            with save_images: the tile pixels (a saved `datasets.Dataset`)
        manifest.parquet          all slides' tiles, merged
        errors.json               the slides that failed, with the reason
    """

    root: Path

    MANIFEST = "manifest.parquet"
    CONFIG = "tiling_config.json"
    ERRORS = "errors.json"

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    @property
    def manifest_path(self) -> Path:
        return self.root / self.MANIFEST

    @property
    def config_path(self) -> Path:
        return self.root / self.CONFIG

    @property
    def errors_path(self) -> Path:
        return self.root / self.ERRORS

    @property
    def manifests_dir(self) -> Path:
        return self.root / "manifests"

    def slide_manifest_path(self, slide_id: str) -> Path:
        return self.manifests_dir / f"{slide_id}.parquet"

    def overlay_path(self, slide_id: str) -> Path:
        return self.root / "overlays" / f"{slide_id}.png"

    def slide_tiles_dir(self, slide_id: str) -> Path:
        return self.root / "tiles" / slide_id

    def read_config(self) -> dict | None:
        return json.loads(self.config_path.read_text()) if self.config_path.is_file() else None

    def read_errors(self) -> list[dict]:
        return json.loads(self.errors_path.read_text()) if self.errors_path.is_file() else []

    def write_errors(self, errors: list[dict]) -> None:
        _write_json(self.errors_path, errors)

    def slide_ids(self) -> list[str]:
        if not self.manifest_path.is_file():
            return []
        return sorted(pd.read_parquet(self.manifest_path, columns=["slide_id"])["slide_id"].unique())

    def is_done(self, slide_id: str, save_images: bool) -> bool:
        # a slide first tiled without images is redone when they are asked for now
        has_images = not save_images or self.slide_tiles_dir(slide_id).is_dir()
        return self.slide_manifest_path(slide_id).exists() and has_images


def is_saved_dataset(folder: Path) -> bool:
    """A folder written by ``datasets``' ``save_to_disk`` (a Dataset or a DatasetDict)."""
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


@dataclass
class TilingReport:
    """The result of `tile_slides`."""

    manifest: pd.DataFrame  # all tiles in out_dir, merged
    tiled: list[str] = field(default_factory=list)  # slide paths tiled in this run
    skipped: list[str] = field(default_factory=list)  # done by an earlier run
    errors: list[dict] = field(default_factory=list)  # {"path", "slide_id", "error", "message"}

    @property
    def all_failed(self) -> bool:
        return bool(self.errors) and not self.tiled and not self.skipped


def tile_slides(
    paths: Iterable[str | Path],
    out_dir: str | Path,
    mpp: float = 0.5,
    tile_size: int = 224,
    overlap: int = 0,
    min_tissue: float = 0.5,
    max_pen_fraction: float = 0.1,
    min_focus: float = 0.0,
    min_brightness: float = 0.0,
    max_brightness: float = 1.0,
    workers: int = 1,
    save_images: bool = False,
    mpp_override: float | None = None,
    backend: str = "auto",
) -> TilingReport:
    """Tile slides into ``out_dir``; resumable, and one bad slide does not stop the rest.

    Writes per slide ``manifests/<slide_id>.parquet`` (last, atomically: its presence means done;
    with ``save_images`` a slide also needs its tiles to count as done)
    and ``overlays/<slide_id>.png`` (thumbnail, tissue outline and tiles), plus with ``save_images``
    the tile pixels as a `datasets.Dataset` in ``tiles/<slide_id>/`` (``save_to_disk`` layout).
    Then merges all manifests into ``manifest.parquet`` and lists failures in ``errors.json``.

    Args:
        paths: slide files (see `find_slides` to expand folders).
        mpp: target um/px of the tiles; tile_size: output px; overlap: px shared by neighbours.
        min_tissue: keep tiles whose tissue fraction is at least this.
        max_pen_fraction, min_focus, min_brightness, max_brightness: tile quality bounds (see `tile_manifest`).
        workers: processes over slides (or threads over tiles when there is a single slide).
        mpp_override: um/px to use for every slide, e.g. for PNGs without resolution metadata.
        backend: slide reader (see `open_slide`).

    Raises:
        ValueError: two slides share a file stem (their outputs would collide), or ``out_dir``
            was tiled with different settings.
    """
    folder = TileFolder(out_dir)
    config = TilingConfig(
        mpp=mpp, tile_size=tile_size, overlap=overlap, min_tissue=min_tissue, max_pen_fraction=max_pen_fraction,
        min_focus=min_focus, min_brightness=min_brightness, max_brightness=max_brightness,
    )  # fmt: skip
    slides = [Path(p) for p in paths]
    _check_unique_ids(slides)
    _check_config(folder, config)

    report = TilingReport(manifest=pd.DataFrame())
    todo = []
    for path in slides:
        if folder.is_done(path.stem, save_images):
            report.skipped.append(str(path))
        else:
            todo.append(path)

    from tqdm.auto import tqdm

    tile_workers = workers if len(todo) == 1 else 1
    job = dict(folder=folder, config=config, save_images=save_images, mpp_override=mpp_override,
               backend=backend, tile_workers=tile_workers, progress=len(todo) == 1)  # fmt: skip
    with _executor(workers, len(todo)) as executor, tqdm(total=len(todo), desc="tiling slides", unit="slide") as bar:
        futures = {executor.submit(_tile_one_slide, path, **job): path for path in todo}
        for future in as_completed(futures):
            path = futures[future]
            try:
                n_tiles = future.result()
                report.tiled.append(str(path))
                bar.set_postfix_str(f"{path.stem}: {n_tiles} tiles")
            except Exception as error:  # any failure of one slide is that slide's, not the run's
                message = str(error) if str(path) in str(error) else f"{path}: {error}"
                failure = {"path": str(path), "slide_id": path.stem, "error": type(error).__name__, "message": message}
                report.errors.append(failure)
                tqdm.write(f"[tile_slides] failed: {type(error).__name__}: {message}", file=sys.stderr)
                folder.write_errors(report.errors)
            bar.update()

    folder.write_errors(report.errors)
    report.manifest = merge_manifests(folder.root)
    return report


def _executor(workers: int, n_slides: int) -> Executor:
    # Slides are independent and CPU-bound (JPEG decoding, morphology): processes; one at a time
    # without the pool's start-up cost when there is nothing to parallelise.
    if workers > 1 and n_slides > 1:
        return ProcessPoolExecutor(max_workers=min(workers, n_slides))
    return ThreadPoolExecutor(max_workers=1)


def _tile_one_slide(
    path: Path,
    folder: TileFolder,
    config: TilingConfig,
    save_images: bool,
    mpp_override: float | None,
    backend: str,
    tile_workers: int,
    progress: bool,
) -> int:
    """Tile one slide and write its outputs; returns the number of tiles. Runs in a worker."""
    with open_slide(path, backend=backend, mpp_override=mpp_override) as slide:
        slide.require_mpp()
        tissue = detect_tissue(slide)
        overlay_path = folder.overlay_path(slide.slide_id)
        if tissue.is_empty:
            save_tissue_overlay(slide, tissue, overlay_path)  # so a person can see why
        require_tissue(slide, tissue)
        manifest = tile_manifest(
            slide, tissue, config.mpp, config.tile_size, config.overlap, config.min_tissue,
            max_pen_fraction=config.max_pen_fraction, min_focus=config.min_focus,
            min_brightness=config.min_brightness, max_brightness=config.max_brightness,
            workers=tile_workers, progress=progress,
        )  # fmt: skip
        save_tissue_overlay(slide, tissue, overlay_path, tiles=manifest)
        if manifest.empty:
            raise SlideError(
                f"{path}: tissue covers {tissue.fraction:.1%} of the slide but no {config.tile_size}px tile at "
                f"{config.mpp} um/px has >= {config.min_tissue:.0%} tissue, <= {config.max_pen_fraction:.0%} pen ink, "
                f"focus >= {config.min_focus} and brightness in [{config.min_brightness}, {config.max_brightness}]; "
                f"lower min_tissue (--min-tissue) or loosen those bounds (--max-pen-fraction, --min-focus, ...)"
            )
    if save_images:
        _save_tile_images(manifest, folder.slide_tiles_dir(path.stem), backend, tile_workers)
    _write_parquet(manifest, folder.slide_manifest_path(path.stem))
    return len(manifest)


def _save_tile_images(manifest: pd.DataFrame, target: Path, backend: str, workers: int) -> None:
    """Write the manifest's tiles (image + manifest columns) with ``datasets.save_to_disk``, atomically."""
    import datasets

    features = datasets.Features(
        {"image": datasets.Image(), **{c: datasets.Value(_arrow_type(manifest[c].dtype)) for c in MANIFEST_COLUMNS}}
    )
    scratch = target.with_name(target.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    bars_were_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # one bar per slide is enough: tile_slides shows it
    try:
        # the generator's arrow cache goes next to the output, not into the user's HF cache
        tiles = datasets.Dataset.from_generator(
            _tile_examples,
            features=features,
            gen_kwargs={"rows": manifest.to_dict("records"), "backend": backend, "workers": workers},
            cache_dir=str(scratch / "cache"),
        )
        tiles.save_to_disk(str(scratch / "dataset"))
        del tiles  # release the memory-mapped cache before removing it
    finally:
        if bars_were_enabled:
            datasets.enable_progress_bars()
    shutil.rmtree(target, ignore_errors=True)
    os.replace(scratch / "dataset", target)
    shutil.rmtree(scratch, ignore_errors=True)


def _tile_examples(rows: list[dict], backend: str, workers: int, chunk: int = 256) -> Iterator[dict]:
    """Yield ``{"image": PIL tile, **row}`` in manifest order, reading ``chunk`` tiles at a time in threads."""
    if not rows:
        return
    with open_slide(rows[0]["path"], backend=backend) as slide, ThreadPoolExecutor(max_workers=workers) as pool:

        def read(row: dict):
            return slide.read_tile((row["x"], row["y"]), row["level"], row["read_size"], row["tile_size"])

        for start in range(0, len(rows), chunk):
            batch = rows[start : start + chunk]
            for row, image in zip(batch, pool.map(read, batch)):
                yield {"image": image, **row}


def _arrow_type(dtype) -> str:
    return {"int64": "int64", "float64": "float64"}.get(str(dtype), "string")


def merge_manifests(out_dir: str | Path) -> pd.DataFrame:
    """Concatenate the per-slide manifests of a `TileFolder` into its ``manifest.parquet`` (atomically); return it."""
    folder = TileFolder(out_dir)
    parts = [pd.read_parquet(p) for p in sorted(folder.manifests_dir.glob("*.parquet"))]
    merged = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=list(MANIFEST_COLUMNS))
    merged = merged.astype(_MANIFEST_DTYPES)
    _write_parquet(merged, folder.manifest_path)
    return merged


def _write_parquet(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as partial:
        frame.to_parquet(partial, index=False)


def _write_json(path: Path, data: object) -> None:
    with atomic_path(path) as partial:
        partial.write_text(json.dumps(data, indent=2) + "\n")


def _check_unique_ids(slides: list[Path]) -> None:
    seen: dict[str, Path] = {}
    for path in slides:
        if path.stem in seen and seen[path.stem].resolve() != path.resolve():
            raise ValueError(f"two slides share the id {path.stem!r} (file stem): {seen[path.stem]} and {path}")
        seen[path.stem] = path


def _check_config(folder: TileFolder, config: TilingConfig) -> None:
    """Record the settings on first use of the folder; refuse to mix tiles made with other settings."""
    config_path = folder.config_path
    previous = folder.read_config()
    if previous is not None:
        changed = {k: (previous.get(k), v) for k, v in asdict(config).items() if previous.get(k) != v}
        if changed:
            details = ", ".join(f"{k}: {old} -> {new}" for k, (old, new) in changed.items())
            raise ValueError(
                f"{folder.root} was tiled with other settings ({details}, see {config_path}); use a new --out folder"
            )
    else:
        _write_json(config_path, asdict(config))
