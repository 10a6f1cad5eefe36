"""Tile slides at a physical resolution: a grid of level-0 boxes over tissue, saved as manifests.

A tile is a row ``(slide_id, path, x, y, level, read_size, tile_size, mpp, tissue_fraction, pen_fraction,
focus, brightness)``: read ``read_size`` px at pyramid ``level`` from level-0 ``(x, y)``, then resize to
``tile_size``; the last three are the tile's quality scores (`histomim.data.quality`).
Manifests hold no pixels; `histomim.data.tiles` reads tiles from the slides when training.

`tile_slides` runs over many slides and is safe to interrupt and rerun: each slide's manifest
is written atomically once the slide is finished, finished slides are skipped, and one bad
slide (or a worker process that dies on it) is recorded in ``errors.json`` without stopping the
others. A finished slide is one tiled from the same file (resolved path, size, modification time)
with the same settings; a different file under the same id is refused, never skipped as done.
``complete.json``, written last, tells consumers that the folder is not from an interrupted run.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import numbers
import os
import shutil
import signal
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
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
    TilingConfig(mpp=mpp, tile_size=tile_size, overlap=overlap)  # validates
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
    TilingConfig(mpp=mpp, tile_size=tile_size, overlap=overlap, min_tissue=min_tissue, max_pen_fraction=max_pen_fraction,
                 min_focus=min_focus, min_brightness=min_brightness, max_brightness=max_brightness)  # validates
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


def _is_positive_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _is_integer(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class TilingConfig:
    """What determines a manifest's content; a rerun into the same folder must not change it.

    Checked when made, so that a typo is refused before it is recorded as the folder's settings.
    """

    mpp: float = 0.5
    tile_size: int = 224
    overlap: int = 0
    min_tissue: float = 0.5
    max_pen_fraction: float = 0.1
    min_focus: float = 0.0
    min_brightness: float = 0.0
    max_brightness: float = 1.0

    def __post_init__(self):
        if not _is_positive_number(self.mpp):
            raise ValueError(f"mpp (--mpp) must be a positive number of um/px, got {self.mpp!r}")
        if not _is_integer(self.tile_size) or self.tile_size < 1:
            raise ValueError(f"tile_size (--tile-size) must be an integer >= 1, got {self.tile_size!r}")
        if not _is_integer(self.overlap) or not 0 <= self.overlap < self.tile_size:
            raise ValueError(f"overlap (--overlap) must be an integer in [0, tile_size={self.tile_size}), got {self.overlap!r}")
        if not isinstance(self.min_tissue, numbers.Real) or not 0 <= self.min_tissue <= 1:  # NaN fails too
            raise ValueError(f"min_tissue (--min-tissue) must be in [0, 1], got {self.min_tissue!r}")
        check_quality_bounds(self.max_pen_fraction, self.min_focus, self.min_brightness, self.max_brightness)


def slide_identity(path: str | Path) -> dict:
    """What makes a slide file this slide: resolved path (symlinks followed), size and modification time.

    Recorded with its tiles and features; a file that differs in any of them is another slide
    (a copy elsewhere, a re-saved crop, a rescan), however it is named.
    """
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return {"path": str(resolved), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def describe_slide_identity(identity: dict | None) -> str:
    if not identity:
        return "an unrecorded file"
    return f"{identity['path']} ({identity['size']} bytes, mtime_ns {identity['mtime_ns']})"


@dataclass(frozen=True)
class TileFolder:
    """The output folder of `tile_slides`, and the one place where its file names are spelled::

        tiling_config.json        the settings (`TilingConfig`); a rerun with others is refused
        manifests/<slide>.parquet one per finished slide, written last (its presence means done); its
                                  parquet metadata records the slide file's identity and mpp override
        overlays/<slide>.png      thumbnail, tissue outline and tiles
        tiles/<slide>/            with save_images: the tile pixels (a saved `datasets.Dataset`)
        manifest.parquet          all slides' tiles, merged
        errors.json               the slides that failed, with the reason
        complete.json             written last by a finished run, removed when a run starts
    """

    root: Path

    MANIFEST = "manifest.parquet"
    CONFIG = "tiling_config.json"
    ERRORS = "errors.json"
    COMPLETE = "complete.json"
    SLIDE_RECORD_KEY = b"histomim.slide"  # parquet metadata key of a per-slide manifest

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

    @property
    def complete_path(self) -> Path:
        return self.root / self.COMPLETE

    @classmethod
    def containing(cls, path: str | Path) -> TileFolder | None:
        """The tile folder that ``path`` is, or holds it (its manifest, ``tiles/``, ``tiles/<slide>``); else None."""
        path = Path(path)
        for candidate in (path, *list(path.parents)[:2]):
            if (candidate / cls.CONFIG).is_file():
                return cls(candidate)
        return None

    @property
    def is_complete(self) -> bool:
        return self.complete_path.is_file()

    def require_complete(self) -> None:
        """Refuse a folder whose tiling run was interrupted (or is still running): it lacks slides."""
        if not self.is_complete:
            raise IncompleteTileFolderError(
                f"{self.root} is an unfinished tile folder: the `histomim tile` run that wrote it did not finish "
                f"(no {self.COMPLETE}); rerun it with the same arguments to finish it (finished slides are kept)"
            )

    def read_config(self) -> dict | None:
        return json.loads(self.config_path.read_text()) if self.config_path.is_file() else None

    def read_slide_record(self, slide_id: str) -> dict | None:
        """What a finished slide was tiled from (`slide_identity`, ``mpp_override``); None if not done or unrecorded."""
        import pyarrow.parquet as pq

        path = self.slide_manifest_path(slide_id)
        if not path.is_file():
            return None
        record = (pq.read_schema(path).metadata or {}).get(self.SLIDE_RECORD_KEY)
        return json.loads(record) if record else None

    def remove_slide_outputs(self, slide_id: str) -> None:
        self.slide_manifest_path(slide_id).unlink(missing_ok=True)  # first: the slide is no longer done
        shutil.rmtree(self.slide_tiles_dir(slide_id), ignore_errors=True)
        self.overlay_path(slide_id).unlink(missing_ok=True)

    def remove_all_outputs(self) -> None:
        """Everything made with the folder's settings (not the settings file itself)."""
        for name in ("manifests", "overlays", "tiles"):
            shutil.rmtree(self.root / name, ignore_errors=True)
        for path in (self.manifest_path, self.errors_path):
            path.unlink(missing_ok=True)

    def read_errors(self) -> list[dict]:
        return json.loads(self.errors_path.read_text()) if self.errors_path.is_file() else []

    def write_errors(self, errors: list[dict]) -> None:
        _write_json(self.errors_path, errors)

    def slide_ids(self) -> list[str]:
        if not self.manifest_path.is_file():
            return []
        return sorted(pd.read_parquet(self.manifest_path, columns=["slide_id"])["slide_id"].unique())

    def has_images(self, slide_id: str) -> bool:
        return self.slide_tiles_dir(slide_id).is_dir()


class IncompleteTileFolderError(ValueError):
    """A tile folder from a `tile_slides` run that was interrupted before it finished."""


class WorkerCrashedError(RuntimeError):
    """The process tiling a slide died (killed, out of memory, a crash in a C library)."""


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

    @property
    def crashed(self) -> list[dict]:
        """Errors of slides whose worker process died: not a verdict on the slide, so the run is not a success."""
        return [error for error in self.errors if error["error"] == WorkerCrashedError.__name__]


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
    overwrite: bool = False,
) -> TilingReport:
    """Tile slides into ``out_dir``; resumable, and one bad slide does not stop the rest.

    Writes per slide ``manifests/<slide_id>.parquet`` (last, atomically: its presence means done;
    with ``save_images`` a slide also needs its tiles to count as done)
    and ``overlays/<slide_id>.png`` (thumbnail, tissue outline and tiles), plus with ``save_images``
    the tile pixels as a `datasets.Dataset` in ``tiles/<slide_id>/`` (``save_to_disk`` layout).
    Then merges all manifests into ``manifest.parquet``, lists failures in ``errors.json`` and
    writes ``complete.json``.

    A slide counts as done only if its manifest was made from the same file (`slide_identity`) with
    the same ``mpp_override``; with ``workers > 1`` each slide is tiled in its own process, so a
    worker that dies (out of memory, a crash in a slide reader) fails only its slide, by name.

    Args:
        paths: slide files (see `find_slides` to expand folders).
        mpp: target um/px of the tiles; tile_size: output px; overlap: px shared by neighbours.
        min_tissue: keep tiles whose tissue fraction is at least this.
        max_pen_fraction, min_focus, min_brightness, max_brightness: tile quality bounds (see `tile_manifest`).
        workers: processes over slides (or threads over tiles when there is a single slide).
        mpp_override: um/px to use for every slide, e.g. for PNGs without resolution metadata.
        backend: slide reader (see `open_slide`).
        overwrite: replace what was made with other settings or from another file (instead of
            refusing); slides that match are still skipped.

    Raises:
        ValueError: a setting is invalid (nothing is written), two slides share a file stem (their
            outputs would collide), or without ``overwrite``: ``out_dir`` was tiled with different
            settings, or a slide id there was tiled from another file or ``mpp_override``.
    """
    folder = TileFolder(out_dir)
    config = TilingConfig(
        mpp=mpp, tile_size=tile_size, overlap=overlap, min_tissue=min_tissue, max_pen_fraction=max_pen_fraction,
        min_focus=min_focus, min_brightness=min_brightness, max_brightness=max_brightness,
    )  # validates
    if mpp_override is not None and not _is_positive_number(mpp_override):
        raise ValueError(f"mpp_override (--mpp-override) must be a positive number of um/px, got {mpp_override!r}")
    if not _is_integer(workers) or workers < 1:
        raise ValueError(f"workers (--workers) must be an integer >= 1, got {workers!r}")
    slides = _unique_slides(Path(p) for p in paths)
    settings_changed = _check_config(folder, config, overwrite)

    # 1. what is done, what is left, and what another file or setting made (refused before any change)
    report = TilingReport(manifest=pd.DataFrame())
    records = {path: {"slide": slide_identity(path), "mpp_override": mpp_override} for path in slides if path.is_file()}
    todo, stale = [], []
    for path in slides:
        previous = None if settings_changed else folder.read_slide_record(path.stem)
        if previous is None or path not in records:  # not tiled, by a histomim that recorded nothing, or missing
            todo.append(path)
        elif previous != records[path]:
            stale.append(path)
        elif save_images and not folder.has_images(path.stem):  # first tiled without images
            todo.append(path)
        else:
            report.skipped.append(str(path))
    if stale and not overwrite:
        raise ValueError(
            f"{folder.root} holds slides made from another file or --mpp-override than now; pass --overwrite "
            "(overwrite=True) to retile them, or use a new --out folder:\n"
            + "\n".join(_describe_change(folder, path, records[path]) for path in stale)
        )

    # 2. from here on the folder changes: it is unfinished until complete.json is written again
    folder.complete_path.unlink(missing_ok=True)
    if settings_changed:
        folder.remove_all_outputs()
    _write_json(folder.config_path, asdict(config))
    for path in stale:
        folder.remove_slide_outputs(path.stem)
        todo.append(path)

    from tqdm.auto import tqdm

    tile_workers = workers if len(todo) == 1 else 1
    job = dict(folder=folder, config=config, save_images=save_images, mpp_override=mpp_override,
               backend=backend, tile_workers=tile_workers, progress=len(todo) == 1)  # fmt: skip
    # slides are independent and CPU-bound: each in its own process when several run at once (a crash
    # then takes only its slide), in this process when there is nothing to parallelise
    own_process = workers > 1 and len(todo) > 1
    tile = _tile_one_slide  # looked up now: a worker process is handed this function

    def run(path: Path) -> int:
        return _call_in_own_process(tile, path, job) if own_process else tile(path, **job)

    pool_size = min(workers, len(todo)) if own_process else 1
    with ThreadPoolExecutor(max_workers=pool_size) as executor, tqdm(total=len(todo), desc="tiling slides", unit="slide") as bar:
        futures = {executor.submit(run, path): path for path in todo}
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
    summary = {"slides": sorted(report.manifest["slide_id"].unique()), "tiles": len(report.manifest),
               "failed": [error["path"] for error in report.errors]}  # fmt: skip
    _write_json(folder.complete_path, summary)  # last: consumers may now trust the folder
    return report


def _describe_change(folder: TileFolder, path: Path, record: dict) -> str:
    previous = folder.read_slide_record(path.stem)
    changes = []
    if previous["slide"] != record["slide"]:
        changes.append(
            f"tiled from {describe_slide_identity(previous['slide'])}, now {describe_slide_identity(record['slide'])}"
        )
    if previous.get("mpp_override") != record["mpp_override"]:
        changes.append(f"--mpp-override {previous.get('mpp_override')} -> {record['mpp_override']}")
    return f"  {folder.slide_manifest_path(path.stem)}: " + "; ".join(changes)


# -- a worker process per slide --------------------------------------------------------------------

# A forkserver child starts from a clean process with this module imported, not from a copy of a
# parent that holds threads (tqdm's monitor, the thread pool) and their locks.
_WORKER_CONTEXT = multiprocessing.get_context("forkserver")
_WORKER_CONTEXT.set_forkserver_preload([__name__])


def _call_in_own_process(function: Callable, path: Path, kwargs: dict):
    """``function(path, **kwargs)`` in a new process; its exception is re-raised here, its death named.

    Raises:
        WorkerCrashedError: the process died before answering (a signal such as the OOM killer's SIGKILL,
            or a crash in a C library); the message names the slide and how the process ended.
    """
    receive, send = _WORKER_CONTEXT.Pipe(duplex=False)
    process = _WORKER_CONTEXT.Process(target=_answer_from_child, args=(send, function, path, kwargs), daemon=True)
    process.start()
    send.close()  # the child holds the only writer: its death ends the pipe
    try:
        status, value = receive.recv()
    except EOFError:
        process.join()
        raise WorkerCrashedError(
            f"{path}: the worker process tiling this slide died ({_describe_exit(process.exitcode)}); "
            "the other slides went on. Rerun to retry it (e.g. with fewer --workers if memory ran out)"
        ) from None
    finally:
        receive.close()
    process.join()
    if status == "error":
        raise value
    return value


def _answer_from_child(connection, function: Callable, path: Path, kwargs: dict) -> None:
    try:
        answer = ("ok", function(path, **kwargs))
    except Exception as error:
        answer = ("error", error)
    try:
        connection.send(answer)
    except Exception:  # an exception that does not pickle: send its type and text
        connection.send(("error", RuntimeError(f"{type(answer[1]).__name__}: {answer[1]}")))
    connection.close()


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        return f"killed by {name}" + (", often the out-of-memory killer" if name == "SIGKILL" else "")
    return f"exit status {exitcode}"


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
    record = {"slide": slide_identity(path), "mpp_override": mpp_override}  # before reading: a file changed
    with open_slide(path, backend=backend, mpp_override=mpp_override) as slide:  # meanwhile is not recorded
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
    _write_parquet(manifest, folder.slide_manifest_path(path.stem), {TileFolder.SLIDE_RECORD_KEY: record})
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


def _write_parquet(frame: pd.DataFrame, path: Path, metadata: dict[bytes, object] | None = None) -> None:
    """``frame`` as parquet, atomically, with ``metadata`` (JSON values) added to the file's schema metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame, preserve_index=False)
    extra = {key: json.dumps(value).encode() for key, value in (metadata or {}).items()}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **extra})
    with atomic_path(path) as partial:
        pq.write_table(table, partial)


def _write_json(path: Path, data: object) -> None:
    with atomic_path(path) as partial:
        partial.write_text(json.dumps(data, indent=2) + "\n")


def _unique_slides(slides: Iterable[Path]) -> list[Path]:
    """The slides, each file once (also when reached through two paths); two files with one id are refused."""
    seen: dict[str, Path] = {}
    unique = []
    for path in slides:
        if path.stem in seen:
            if seen[path.stem].resolve() != path.resolve():
                raise ValueError(
                    f"two slides share the id {path.stem!r} (file stem): {seen[path.stem]} and {path}; "
                    "their tiles would mix: rename one, or tile them into separate --out folders"
                )
            continue  # the same file again (a symlink, a repeated input)
        seen[path.stem] = path
        unique.append(path)
    return unique


def _check_config(folder: TileFolder, config: TilingConfig, overwrite: bool) -> bool:
    """Whether ``out_dir`` was tiled with other settings (allowed with ``overwrite`` only); writes nothing."""
    previous = folder.read_config()
    if previous is None:
        return False
    changed = {k: (previous.get(k), v) for k, v in asdict(config).items() if previous.get(k) != v}
    if changed and not overwrite:
        details = ", ".join(f"{k}: {old} -> {new}" for k, (old, new) in changed.items())
        raise ValueError(
            f"{folder.root} was tiled with other settings ({details}, see {folder.config_path}); use a new --out "
            "folder, or --overwrite (overwrite=True) to retile it with the new settings, replacing its tiles"
        )
    return bool(changed)
