"""Turn any tile source into a torch dataset of ``{"pixel_values": (3, H, W) float tensor}``.

One entry point, `load_tile_dataset`, accepts:

* an image folder (searched recursively),
* a `datasets` dataset saved with ``save_to_disk`` (or a folder of them, as `tile_slides` writes),
* parquet file(s) or a folder with an ``Image`` column,
* a Hub dataset id (``datasets.load_dataset``),
* a tile manifest (parquet or DataFrame from `histomim.data.tiling`): tiles are read from the
  slides on the fly, so nothing has to be extracted first.

Every source becomes rows of a ``datasets.Dataset`` (or ``IterableDataset`` when streaming) plus
a rule for getting the image of a row: its ``Image`` column (decoded here, so that a bad file is
named), or `read_tile` for manifests. A tile that cannot be read raises `TileReadError` naming the
file (and the tile's coordinates); with ``skip_unreadable`` (pretraining) it is warned about, counted
and replaced by the next readable tile, so one truncated JPEG does not end a long run.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from PIL import Image

from .slides import Slide, open_slide
from .tiling import MANIFEST_COLUMNS, TileFolder, is_saved_dataset
from .transforms import Compose, ToTensor

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
_READ_COLUMNS = ("path", "x", "y", "level", "read_size", "tile_size")  # what read_tile needs
_MAX_STREAM_SHARDS = 64  # shards handed out to DataLoader workers / ranks when streaming local data


class TileReadError(RuntimeError):
    """A tile that cannot be read: a truncated or corrupt image, an unreadable slide or slide region."""


class TileReadWarning(UserWarning):
    """An unreadable tile was skipped (``skip_unreadable``)."""


_MAX_SKIPPED_IN_A_ROW = 16  # unreadable tiles in a row before a skipping dataset gives up: the source is broken


# -- reading manifest tiles ------------------------------------------------------------------

_MAX_OPEN_SLIDES = 32
_open_slides: OrderedDict[str, Slide] = OrderedDict()  # per process: path -> open slide, LRU order
# A forked DataLoader worker must not share the parent's file handles (their read offsets are
# shared between processes), so each child starts with an empty cache.
os.register_at_fork(after_in_child=_open_slides.clear)


def _cached_slide(path: str) -> Slide:
    slide = _open_slides.pop(path, None) or open_slide(path)
    _open_slides[path] = slide  # most recently used last
    if len(_open_slides) > _MAX_OPEN_SLIDES:
        _open_slides.popitem(last=False)[1].close()
    return slide


def read_tile(row: Mapping[str, Any]) -> Image.Image:
    """Read one manifest row's tile from its slide; an RGB PIL image of ``tile_size`` px.

    Slide handles are cached per process, so a DataLoader worker opens each slide once.
    """
    missing = [c for c in _READ_COLUMNS if c not in row]
    if missing:
        raise KeyError(f"manifest row lacks column(s) {missing}; needs {list(_READ_COLUMNS)}")
    slide = _cached_slide(str(row["path"]))
    location = (int(row["x"]), int(row["y"]))
    return slide.read_tile(location, int(row["level"]), int(row["read_size"]), int(row["tile_size"]))


# -- rows -> items ----------------------------------------------------------------------------


class _RowToItem:
    """Image of a row (its Image column, or read from the slide), transformed, plus kept columns."""

    def __init__(
        self, image_column: str | None, transform: Callable | None, keep_columns: Sequence[str], image_feature=None
    ):
        self.image_column = image_column
        self.image_feature = image_feature  # the column's datasets.Image, when rows hold undecoded images
        self.transform = transform if transform is not None else Compose([ToTensor()])
        self.keep_columns = tuple(keep_columns)

    def __call__(self, row: Mapping[str, Any], index: int | None = None, epoch: int = 0) -> dict[str, Any]:
        image = self.image(row, index)
        if isinstance(self.transform, Compose):
            pixel_values = self.transform(image, index=index, epoch=epoch)  # seeded per (epoch, index)
        else:
            pixel_values = self.transform(image)
        return {"pixel_values": pixel_values, **{c: row[c] for c in self.keep_columns}}

    def image(self, row: Mapping[str, Any], index: int | None) -> Image.Image:
        """The row's image, or a `TileReadError` that names its file (and coordinates)."""
        try:
            if self.image_column is None:
                return read_tile(row)
            value = row[self.image_column]
            if self.image_feature is not None and isinstance(value, dict):
                if value.get("bytes") is None and value.get("path") and os.path.isfile(value["path"]):
                    value = {**value, "bytes": Path(value["path"]).read_bytes()}  # no file left open if it fails
                return self.image_feature.decode_example(value)
            return value
        except Exception as error:  # every reader and decoder raises its own types (OSError, Jpeg8Error, ...)
            raise TileReadError(f"{self.describe(row, index)}: {type(error).__name__}: {error}") from error

    def describe(self, row: Mapping[str, Any], index: int | None) -> str:
        if self.image_column is None:
            return f"{row['path']}: tile at level-0 (x, y) = ({int(row['x'])}, {int(row['y'])}), level {row.get('level', 0)}"
        value = row[self.image_column]
        where = value.get("path") if isinstance(value, dict) else None
        where = where or f"the image of row {index}"
        if all(c in row for c in ("slide_id", "x", "y")):  # tile images saved by tile_slides
            where += f" (slide {row['slide_id']}, level-0 (x, y) = ({int(row['x'])}, {int(row['y'])}))"
        return where


class _SkipCount:
    """Unreadable tiles skipped, in shared memory so that DataLoader workers add to the same count."""

    def __init__(self):
        self._count = torch.zeros((), dtype=torch.int64).share_memory_()
        self._seen: set[int] = set()  # per process: rows already found unreadable, not read again

    def note(self, key: int, error: TileReadError) -> None:
        if key not in self._seen:
            self._seen.add(key)
            self._count.add_(1)
            warnings.warn(f"skipped an unreadable tile: {error}", TileReadWarning, stacklevel=3)

    def __contains__(self, key: int) -> bool:
        return key in self._seen

    def __int__(self) -> int:
        return int(self._count)


class TileDataset(torch.utils.data.Dataset):
    """Map-style tiles. ``set_epoch`` changes the augmentation of seeded `Compose` transforms.

    The epoch lives in shared memory, so ``set_epoch`` also reaches persistent DataLoader workers.
    """

    def __init__(self, rows, to_item: _RowToItem, skip_unreadable: bool = False):
        self.rows = rows  # datasets.Dataset
        self.to_item = to_item
        self.skip_unreadable = skip_unreadable
        self._skipped = _SkipCount()
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not self.skip_unreadable:
            return self.to_item(self.rows[index], index=index, epoch=self.epoch)
        # an unreadable row is replaced by the next readable one: the same one on every run (exact resume)
        error = None
        for offset in range(_MAX_SKIPPED_IN_A_ROW):
            candidate = (index + offset) % len(self)
            if candidate in self._skipped:
                continue
            try:
                return self.to_item(self.rows[candidate], index=index, epoch=self.epoch)
            except TileReadError as unreadable:
                error = unreadable
                self._skipped.note(candidate, unreadable)
        raise TileReadError(f"{_MAX_SKIPPED_IN_A_ROW} tiles in a row from index {index} are unreadable; the last: {error}")

    @property
    def skipped_unreadable(self) -> int:
        """Unreadable tiles skipped so far (each named in a `TileReadWarning`; once per loading process)."""
        return int(self._skipped)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def __repr__(self) -> str:
        return f"TileDataset(num_rows={len(self)}, image_column={self.to_item.image_column!r})"


class StreamingTileDataset(torch.utils.data.IterableDataset):
    """Iterable tiles that never need the whole source on disk or in memory.

    Rows are split between distributed ranks when built and between DataLoader workers when
    iterated (by `datasets`), so every tile is seen once per epoch across all of them.
    """

    def __init__(self, rows, to_item: _RowToItem, skip_unreadable: bool = False):
        self.rows = rows  # datasets.IterableDataset
        self.to_item = to_item
        self.skip_unreadable = skip_unreadable
        self._skipped = _SkipCount()

    def __iter__(self):
        in_a_row = 0
        for position, row in enumerate(self.rows):
            try:
                yield self.to_item(row)
                in_a_row = 0
            except TileReadError as error:
                in_a_row += 1
                if not self.skip_unreadable or in_a_row >= _MAX_SKIPPED_IN_A_ROW:
                    raise
                self._skipped.note(position, error)

    @property
    def skipped_unreadable(self) -> int:
        """Unreadable tiles skipped so far (each named in a `TileReadWarning`)."""
        return int(self._skipped)

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle (after `shuffle`) differently each epoch."""
        self.rows.set_epoch(epoch)

    def shuffle(self, seed: int | None = None, buffer_size: int = 1000) -> StreamingTileDataset:
        """Shuffle shard order and within a ``buffer_size`` window (see ``datasets.IterableDataset.shuffle``)."""
        return StreamingTileDataset(self.rows.shuffle(seed=seed, buffer_size=buffer_size), self.to_item, self.skip_unreadable)


# -- sources -> rows --------------------------------------------------------------------------


def load_tile_dataset(
    source: str | Path | pd.DataFrame,
    transform: Callable | None = None,
    streaming: bool = False,
    split: str = "train",
    keep_columns: Sequence[str] = (),
    rank: int | None = None,
    world_size: int | None = None,
    skip_unreadable: bool = False,
) -> TileDataset | StreamingTileDataset:
    """Load tiles from any supported source as a torch dataset of ``{"pixel_values": ...}`` dicts.

    Args:
        source: image folder, ``save_to_disk`` folder, parquet file/folder, tile manifest
            (parquet, folder written by `tile_slides`, or DataFrame) or Hub dataset id.
        transform: PIL image -> tensor, e.g. `pretrain_transform(...)`; defaults to `ToTensor`.
            A seeded `Compose` gets the sample index and epoch for reproducible augmentation.
        streaming: return a `StreamingTileDataset` (``torch.utils.data.IterableDataset``).
        split: split to use for Hub datasets and saved ``DatasetDict``s.
        keep_columns: row fields to pass through next to ``pixel_values`` (e.g. ``("slide_id", "x", "y")``).
        rank, world_size: when streaming, this process's share; default from ``torch.distributed``
            or the ``RANK``/``WORLD_SIZE`` variables. Pass ``world_size=1`` if the training loop
            splits batches itself (e.g. Accelerate's ``dispatch_batches``).
        skip_unreadable: replace a tile that cannot be read (truncated image, corrupt slide) by the next
            readable one, with a `TileReadWarning` naming it and a count in ``skipped_unreadable``;
            otherwise reading it raises `TileReadError`. Never for features, whose rows must stay the tiles'.

    Raises:
        FileNotFoundError: a local path that does not exist, or an id that cannot be loaded.
        IncompleteTileFolderError: a `tile_slides` folder (or part of one) whose run did not finish.
        ValueError: a folder with nothing to load, or rows with neither an Image column nor manifest columns.
    """
    rows = _load_rows(source, split, streaming)
    image_column = _image_column(rows, source)
    columns = _column_names(rows)
    if columns is not None:
        absent = [c for c in keep_columns if c not in columns]
        if absent:
            raise ValueError(f"{source}: keep_columns {absent} not among the columns {columns}")
    import datasets
    from datasets.distributed import split_dataset_by_node

    image_feature = None
    if image_column is not None and columns is not None:  # decode in _RowToItem, which names a bad file
        image_feature = rows.features[image_column]
        rows = rows.cast_column(image_column, datasets.Image(mode=image_feature.mode, decode=False))
    to_item = _RowToItem(image_column, transform, keep_columns, image_feature)
    if not streaming:
        return TileDataset(rows, to_item, skip_unreadable)

    if isinstance(rows, datasets.Dataset):
        rows = rows.to_iterable_dataset(num_shards=max(1, min(len(rows), _MAX_STREAM_SHARDS)))
    rank, world_size = _rank_and_world_size(rank, world_size)
    if world_size > 1:
        rows = split_dataset_by_node(rows, rank=rank, world_size=world_size)
    return StreamingTileDataset(rows, to_item, skip_unreadable)


def _load_rows(source: str | Path | pd.DataFrame, split: str, streaming: bool):
    """Any source -> ``datasets.Dataset`` (or ``IterableDataset`` for streamed remote/parquet data)."""
    import datasets

    if isinstance(source, pd.DataFrame):
        return _manifest_rows(source, "the DataFrame")
    path = Path(source)
    tile_folder = TileFolder.containing(path) if path.exists() else None
    if tile_folder is not None:  # its manifests and tiles lack slides until its tiling run has finished
        tile_folder.require_complete()
    if path.is_file():
        if path.suffix.lower() != ".parquet":
            raise ValueError(f"unsupported file {path}: expected a .parquet manifest or dataset (or pass a folder)")
        if _is_manifest_parquet(path):
            return _manifest_rows(pd.read_parquet(path), path)
        return datasets.load_dataset("parquet", data_files=str(path), split="train", streaming=streaming)
    if path.is_dir():
        return _load_folder(path, split, streaming)
    if str(source).startswith((os.sep, ".", "~")) or path.suffix:
        raise FileNotFoundError(f"tile source not found: {source}")
    return _load_hub_dataset(str(source), split, streaming)


def _load_folder(folder: Path, split: str, streaming: bool):
    import datasets

    # 1. a saved dataset, or a folder of them (tile_slides --save-images writes tiles/<slide_id>/)
    if is_saved_dataset(folder):
        return _load_saved(folder, split)
    saved = sorted(p for p in folder.iterdir() if p.is_dir() and is_saved_dataset(p))
    if saved:
        return datasets.concatenate_datasets([_load_saved(p, split) for p in saved])
    # 2. a tile_slides output folder, or a folder of manifests
    manifest_path = TileFolder(folder).manifest_path
    if manifest_path.is_file():
        return _manifest_rows(pd.read_parquet(manifest_path), manifest_path)
    parquet_files = sorted(folder.rglob("*.parquet"))
    if parquet_files and all(_is_manifest_parquet(p) for p in parquet_files):
        return _manifest_rows(pd.concat([pd.read_parquet(p) for p in parquet_files], ignore_index=True), folder)
    # 3. a dataset repository layout (parquet with an Image column): the same loader as the Hub
    if parquet_files:
        return _load_hub_dataset(str(folder), split, streaming)
    # 4. loose images; the dataset holds paths only, images are decoded when read
    images = [str(p) for p in image_files(folder)]
    if images:
        return datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()}))
    raise ValueError(
        f"no images ({', '.join(IMAGE_EXTENSIONS)}), parquet files or saved dataset found in folder {folder}"
    )


def image_files(folder: str | Path) -> list[Path]:
    """The image files under ``folder`` (recursively), sorted: the rows, in order, of an image-folder source."""
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _load_hub_dataset(source: str, split: str, streaming: bool):
    import datasets

    try:
        return datasets.load_dataset(source, split=split, streaming=streaming)
    except (OSError, ValueError) as error:  # not found, offline, unknown split, ...
        raise FileNotFoundError(
            f"cannot load tile source {source!r} as a local path or with datasets.load_dataset: {error}"
        ) from error


def _load_saved(folder: Path, split: str):
    import datasets

    loaded = datasets.load_from_disk(str(folder))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"{folder}: no split {split!r}; available: {list(loaded)}")
        loaded = loaded[split]
    return loaded


def _manifest_rows(manifest: pd.DataFrame, where: object):
    import datasets

    missing = [c for c in _READ_COLUMNS if c not in manifest.columns]
    if missing:
        raise ValueError(f"{where}: tile manifest lacks column(s) {missing}; has {list(manifest.columns)}")
    return datasets.Dataset.from_pandas(manifest.reset_index(drop=True), preserve_index=False)


def _is_manifest_parquet(path: Path) -> bool:
    import pyarrow.parquet as pq

    names = set(pq.read_schema(path).names)
    return set(MANIFEST_COLUMNS) <= names and "image" not in names


def _column_names(rows) -> list[str] | None:
    return list(rows.features) if rows.features is not None else None


def _image_column(rows, source: object) -> str | None:
    """The first ``Image`` column; None for manifests (tiles are read from slides)."""
    import datasets

    columns = _column_names(rows)
    if columns is None:  # a stream whose features are only known once read
        return "image"
    images = [name for name, feature in rows.features.items() if isinstance(feature, datasets.Image)]
    if images:
        return images[0]
    if all(c in columns for c in _READ_COLUMNS):
        return None
    raise ValueError(
        f"{source}: no Image column and not a tile manifest (columns {columns}); cast the image column "
        f"with dataset.cast_column(name, datasets.Image()) or provide the manifest columns {list(_READ_COLUMNS)}"
    )


def _rank_and_world_size(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        found = rank, world_size
    elif torch.distributed.is_available() and torch.distributed.is_initialized():
        found = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        found = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    rank = found[0] if rank is None else rank
    world_size = found[1] if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    return rank, world_size
