"""Labelled images for evaluation, from any of the sources people keep them in, plus the train/test split.

Every loader returns `LabelledImages`: images (PIL, read lazily where they are files), integer labels,
class names, and the group (source image or slide) of each image, which a group split keeps together.

    image_folder("tiles/")                           # tiles/<class>/<image>
    image_table("labels.csv", path_column="path", label_column="label")   # or .parquet
    hf_dataset("path/to/saved_dataset", label_column="label")   # datasets with an Image column
    nucleus_crops(sample_nuclei_pairs(), crop_size=32)           # image + HoVer-Net mask pairs

Nucleus crops: a ``crop_size`` square centred on each nucleus (`inst_centroid`, (x, y) in HoVer-Net
files), the image reflected at its borders so that crops of nuclei at the edge are whole; the label is
the nucleus type (`inst_type`), the group the source image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
SPLITS = ("stratified", "group")


class _LazyImages(Sequence):
    """Image files opened as RGB only when indexed, so a large folder costs no memory up front."""

    def __init__(self, paths: Sequence[str | Path]):
        self.paths = [str(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        with Image.open(self.paths[index]) as image:
            return image.convert("RGB")


@dataclass
class LabelledImages:
    """Images with integer labels in ``range(len(class_names))`` and the group each image comes from."""

    images: Sequence  # PIL images, indexable
    labels: np.ndarray  # (N,) int64
    class_names: list[str]
    groups: np.ndarray  # (N,) str: the source image / slide, kept on one side of a group split
    description: str  # what was loaded, for reports and model cards

    def __post_init__(self):
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.groups = np.asarray(self.groups, dtype=str)
        if not len(self.images) == len(self.labels) == len(self.groups):
            raise ValueError(f"{len(self.images)} images, {len(self.labels)} labels and {len(self.groups)} groups")
        if len(self.labels) == 0:
            raise ValueError(f"{self.description}: no labelled images")

    def __len__(self) -> int:
        return len(self.labels)

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(self.class_names))
        return {name: int(count) for name, count in zip(self.class_names, counts)}


def _encode(labels: Sequence) -> tuple[np.ndarray, list[str]]:
    """Any labels -> (integer codes, sorted class names as strings)."""
    values = np.asarray(labels)
    classes, codes = np.unique(values, return_inverse=True)
    return codes.astype(np.int64), [str(c) for c in classes]


# -- sources ---------------------------------------------------------------------------------------


def image_folder(folder: str | Path) -> LabelledImages:
    """``folder/<class name>/**/<image>``; the group of an image is its file (no grouping known)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    paths, labels = [], []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        found = sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        paths += found
        labels += [class_dir.name] * len(found)
    if not paths:
        raise ValueError(f"{folder}: expected class subfolders of images ({', '.join(IMAGE_EXTENSIONS)})")
    codes, names = _encode(labels)
    return LabelledImages(_LazyImages(paths), codes, names, np.asarray(paths), f"image folder {folder}")


def image_table(
    table: str | Path, path_column: str = "path", label_column: str = "label", group_column: str | None = None
) -> LabelledImages:
    """A CSV or parquet file of image paths (absolute, or relative to the table's folder) and labels."""
    import pandas as pd

    table = Path(table)
    frame = pd.read_parquet(table) if table.suffix.lower() == ".parquet" else pd.read_csv(table)
    missing = [c for c in (path_column, label_column, group_column) if c and c not in frame.columns]
    if missing:
        raise ValueError(f"{table}: no column(s) {missing}; has {list(frame.columns)}")
    paths = [p if Path(p).is_absolute() else table.parent / p for p in frame[path_column].astype(str)]
    absent = [str(p) for p in paths if not Path(p).is_file()]
    if absent:
        raise FileNotFoundError(f"{table}: {len(absent)} image(s) not found, e.g. {absent[0]}")
    codes, names = _encode(frame[label_column].to_numpy())
    groups = frame[group_column].astype(str).to_numpy() if group_column else np.asarray([str(p) for p in paths])
    return LabelledImages(_LazyImages(paths), codes, names, groups, f"table {table}")


def hf_dataset(
    source, label_column: str = "label", split: str = "train", group_column: str | None = None
) -> LabelledImages:
    """A `datasets.Dataset` (or a ``save_to_disk`` folder, parquet file or Hub id) with an ``Image`` column;
    a ``ClassLabel`` label column gives the class names."""
    import datasets

    if isinstance(source, datasets.Dataset):
        rows, where = source, "a datasets.Dataset"
    else:
        path, where = Path(source), f"dataset {source}"
        if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
            rows = datasets.load_from_disk(str(path))
        elif path.suffix == ".parquet":
            rows = datasets.load_dataset("parquet", data_files=str(path), split="train")
        else:
            rows = datasets.load_dataset(str(source), split=split)
        if isinstance(rows, datasets.DatasetDict):
            rows = rows[split]
    image_columns = [name for name, feature in rows.features.items() if isinstance(feature, datasets.Image)]
    if not image_columns or label_column not in rows.features:
        raise ValueError(f"{where}: needs an Image column and a {label_column!r} column; has {dict(rows.features)}")
    feature = rows.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        codes, names = np.asarray(rows[label_column], dtype=np.int64), list(feature.names)
    else:
        codes, names = _encode(rows[label_column])
    groups = rows[group_column] if group_column else [f"row{i}" for i in range(len(rows))]
    images = _DatasetImages(rows, image_columns[0])
    return LabelledImages(images, codes, names, np.asarray(groups, dtype=str), where)


class _DatasetImages(Sequence):
    def __init__(self, rows, column: str):
        self.rows, self.column = rows, column

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self.rows[int(index)][self.column].convert("RGB")


def read_hovernet_mask(path: str | Path) -> dict[str, np.ndarray]:
    """A HoVer-Net ``.mat`` mask: ``inst_map`` (H, W), ``type_map`` (H, W), ``inst_centroid`` (N, 2) as (x, y)
    and ``inst_type`` (N,)."""
    from scipy.io import loadmat

    mask = loadmat(str(path))
    missing = [k for k in ("inst_centroid", "inst_type") if k not in mask]
    if missing:
        raise ValueError(f"{path}: not a HoVer-Net mask, lacks {missing}")
    return {
        "inst_map": mask.get("inst_map"),
        "type_map": mask.get("type_map"),
        "inst_centroid": np.asarray(mask["inst_centroid"], dtype=np.float64).reshape(-1, 2),
        "inst_type": np.asarray(mask["inst_type"]).reshape(-1).astype(np.int64),
    }


def nucleus_crops(pairs: Sequence[tuple[str | Path, str | Path]], crop_size: int = 32) -> LabelledImages:
    """One ``crop_size`` px RGB crop per nucleus of each (image, HoVer-Net .mat mask) pair, labelled by type.

    Class names are the type ids as strings ("1", "2", ...); the group is the image's file name.
    """
    if crop_size < 2:
        raise ValueError(f"crop_size must be at least 2, got {crop_size}")
    crops, types, groups = [], [], []
    half = crop_size // 2
    for image_path, mask_path in pairs:
        rgb = np.asarray(Image.open(image_path).convert("RGB"))  # (H, W, 3)
        mask = read_hovernet_mask(mask_path)
        padded = np.pad(rgb, ((half, half), (half, half), (0, 0)), mode="reflect")  # (H + 2h, W + 2h, 3)
        for (x, y), nucleus_type in zip(mask["inst_centroid"], mask["inst_type"]):
            # in padded coordinates the crop centred on (x, y) starts at (x, y) - half + half
            left, top = int(round(x)), int(round(y))
            crops.append(Image.fromarray(padded[top : top + crop_size, left : left + crop_size]))
            types.append(int(nucleus_type))
            groups.append(Path(image_path).name)
    codes, names = _encode(types)
    where = f"{crop_size} px nucleus crops of {len(pairs)} image(s): {', '.join(Path(p).name for p, _ in pairs)}"
    return LabelledImages(crops, codes, names, np.asarray(groups), where)


# -- the split ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """Indices of the training and test images, and how they were drawn (for the report)."""

    train: np.ndarray
    test: np.ndarray
    method: str
    seed: int
    test_size: float

    def describe(self) -> dict:
        return {"method": self.method, "seed": self.seed, "test_size": self.test_size,
                "num_train": int(len(self.train)), "num_test": int(len(self.test))}  # fmt: skip


def split_images(data: LabelledImages, method: str = "stratified", test_size: float = 0.3, seed: int = 0) -> Split:
    """Train/test indices: ``stratified`` by label (sklearn's ``train_test_split``), or ``group`` (whole
    groups, e.g. source images, on one side: ``GroupShuffleSplit``). Both are fixed by ``seed``.

    A group split can leave a class out of one side (it says so in the report); a stratified split of
    nuclei puts crops of one image on both sides, so image-level cues (stain, focus) help both the
    model and its random-init twin.
    """
    from sklearn.model_selection import GroupShuffleSplit, train_test_split

    if not 0 < test_size < 1:
        raise ValueError(f"test_size must be in (0, 1), got {test_size}")
    indices = np.arange(len(data))
    if method == "stratified":
        train, test = train_test_split(indices, test_size=test_size, random_state=seed, stratify=data.labels)
    elif method == "group":
        if len(np.unique(data.groups)) < 2:
            raise ValueError(f"{data.description}: a group split needs at least two groups")
        splitter = GroupShuffleSplit(n_splits=1, test_size=test_size, random_state=seed)
        train, test = next(splitter.split(indices, data.labels, data.groups))
    else:
        raise ValueError(f"split must be one of {SPLITS}, got {method!r}")
    return Split(np.sort(train), np.sort(test), method, seed, test_size)


__all__ = [
    "LabelledImages", "Split", "image_folder", "image_table", "hf_dataset", "nucleus_crops", "read_hovernet_mask",
    "split_images", "SPLITS",
]  # fmt: skip
