"""Semantic segmentation data and scores: image/mask pairs, per-class IoU and Dice, and the overlay PNG.

    pairs = segmentation_pairs(sample_nuclei_pairs(), target="foreground")  # real H&E + HoVer-Net masks
    scores = segmentation_scores(predicted, truth, num_classes=2)          # IoU/Dice per class, mIoU, mDice
    save_segmentation_overlay(image, truth, predicted, "overlay.png")

Masks are (H, W) integer class maps; ``IGNORE_INDEX`` (255) marks pixels without a label and counts
nowhere. A HoVer-Net ``.mat`` mask gives either ``foreground`` (nucleus vs background, from
``inst_map > 0``) or ``type`` (the ``type_map`` ids, background 0); any other mask file is read as
an image whose pixel values are the class ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IGNORE_INDEX = 255
TARGETS = ("foreground", "type")


@dataclass
class SegmentationPair:
    """One RGB image and its class map of the same size."""

    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) int64 class ids, IGNORE_INDEX = unlabelled
    name: str


def read_class_mask(path: str | Path, target: str = "foreground") -> np.ndarray:
    """(H, W) int64 class ids from a HoVer-Net ``.mat`` (``target`` foreground or type) or a mask image."""
    path = Path(path)
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if path.suffix.lower() == ".mat":
        from .data import read_hovernet_mask

        mask = read_hovernet_mask(path)
        key = "inst_map" if target == "foreground" else "type_map"
        if mask[key] is None:
            raise ValueError(f"{path}: the HoVer-Net mask has no {key} for target {target!r}")
        classes = np.asarray(mask[key]) > 0 if target == "foreground" else np.asarray(mask[key])
        return classes.astype(np.int64)
    from PIL import Image

    mask = np.asarray(Image.open(path))
    if mask.ndim != 2:
        raise ValueError(f"{path}: a mask image must have one channel of class ids, got shape {mask.shape}")
    return mask.astype(np.int64)


def segmentation_pairs(pairs: Sequence[tuple[str | Path, str | Path]], target: str = "foreground") -> list[SegmentationPair]:
    """Read (image, mask) file pairs; the two must have the same height and width."""
    from PIL import Image

    loaded = []
    for image_path, mask_path in pairs:
        image = np.asarray(Image.open(image_path).convert("RGB"))
        mask = read_class_mask(mask_path, target)
        if mask.shape != image.shape[:2]:
            raise ValueError(f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but {image_path} is "
                             f"{image.shape[1]}x{image.shape[0]}")  # fmt: skip
        loaded.append(SegmentationPair(image, mask, Path(image_path).name))
    return loaded


def class_ids(pairs: Sequence[SegmentationPair]) -> list[int]:
    """The labelled class ids that occur in any mask, sorted (IGNORE_INDEX left out)."""
    present = set()
    for pair in pairs:
        present |= set(np.unique(pair.mask).tolist())
    return sorted(present - {IGNORE_INDEX})


def remap_classes(pairs: Sequence[SegmentationPair], ids: Sequence[int]) -> list[SegmentationPair]:
    """Masks with class ``ids[i]`` renumbered to ``i`` (type ids 0, 1, 2, 3, 5 -> 0..4); other ids are ignored."""
    lookup = {int(original): index for index, original in enumerate(ids)}
    remapped = []
    for pair in pairs:
        mask = np.full_like(pair.mask, IGNORE_INDEX)
        for original, index in lookup.items():
            mask[pair.mask == original] = index
        remapped.append(SegmentationPair(pair.image, mask, pair.name))
    return remapped


def confusion_matrix(predicted: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) pixel counts, rows = true class, columns = predicted; ignored pixels left out."""
    predicted, truth = np.asarray(predicted).ravel(), np.asarray(truth).ravel()
    if predicted.shape != truth.shape:
        raise ValueError(f"prediction has {predicted.size} pixels, ground truth {truth.size}")
    labelled = truth != IGNORE_INDEX
    return np.bincount(truth[labelled] * num_classes + predicted[labelled], minlength=num_classes**2).reshape(
        num_classes, num_classes
    )


def scores_from_confusion(confusion: np.ndarray, class_names: Sequence[str] | None = None) -> dict:
    """Per-class IoU = TP / (TP + FP + FN) and Dice = 2TP / (2TP + FP + FN), their means (mIoU, mDice) over the
    classes that occur in the truth or the prediction (a class absent from both has no score: NaN), and pixel
    accuracy."""
    confusion = np.asarray(confusion, dtype=np.float64)
    true_positive = np.diag(confusion)
    false_positive = confusion.sum(axis=0) - true_positive
    false_negative = confusion.sum(axis=1) - true_positive
    union = true_positive + false_positive + false_negative
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, true_positive / union, np.nan)
        dice = np.where(union > 0, 2 * true_positive / (union + true_positive), np.nan)
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(confusion))]
    return {
        "per_class": {name: {"iou": float(iou[i]), "dice": float(dice[i])} for i, name in enumerate(names)},
        "miou": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
        "mdice": float(np.nanmean(dice)) if np.isfinite(dice).any() else float("nan"),
        "pixel_accuracy": float(true_positive.sum() / max(confusion.sum(), 1)),
    }


def segmentation_scores(predicted, truth, num_classes: int, class_names: Sequence[str] | None = None) -> dict:
    """`scores_from_confusion` of one (H, W) prediction or of lists of them (pixels pooled over all images)."""
    if isinstance(predicted, (list, tuple)):
        confusion = sum(confusion_matrix(p, t, num_classes) for p, t in zip(predicted, truth))
    else:
        confusion = confusion_matrix(predicted, truth, num_classes)
    return scores_from_confusion(confusion, class_names)


def class_colours(num_classes: int) -> np.ndarray:
    """(num_classes, 3) float RGB in [0, 1]: background black (never drawn), then matplotlib's tab10 from green (red marks errors)."""
    from matplotlib import colormaps

    tab10 = np.asarray(colormaps["tab10"].colors)
    return np.concatenate([np.zeros((1, 3)), tab10[[2, 1, 0, 4, 5, 6, 7, 8, 9, 3]][: max(num_classes - 1, 0)]])


def blend(image: np.ndarray, mask: np.ndarray, colours: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """(H, W, 3) float image with every non-background class pixel tinted by its colour."""
    rgb = image.astype(np.float64) / 255
    labelled = (mask > 0) & (mask != IGNORE_INDEX)
    tint = colours[np.where(labelled, mask, 0)]  # (H, W, 3)
    rgb[labelled] = (1 - alpha) * rgb[labelled] + alpha * tint[labelled]
    return rgb


def save_segmentation_overlay(
    rows: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, str]],
    path: str | Path,
    class_names: Sequence[str],
    title: str = "",
) -> Path:
    """A PNG with one row per image: the image, the ground truth over it, the prediction over it, and the
    disagreement (red: predicted class wrong, white: right). ``rows``: (image (H, W, 3) uint8, truth (H, W),
    prediction (H, W), caption)."""
    from matplotlib.patches import Patch

    from ..plotting import new_figure, save_png

    colours = class_colours(len(class_names))
    figure = new_figure(figsize=(12, 3.2 * len(rows) + 0.8), layout="constrained")
    axes = np.asarray(figure.subplots(len(rows), 4, squeeze=False))
    for row, (image, truth, predicted, caption) in zip(axes, rows):
        labelled = truth != IGNORE_INDEX
        wrong = labelled & (predicted != truth)
        errors = np.ones(truth.shape + (3,))
        errors[wrong] = (0.85, 0.1, 0.1)
        errors[~labelled] = 0.6
        panels = [(image, caption), (blend(image, truth, colours), "ground truth"),
                  (blend(image, predicted, colours), "prediction"),
                  (errors, f"errors (red): {wrong.sum() / max(labelled.sum(), 1):.1%} of pixels")]  # fmt: skip
        for ax, (picture, label) in zip(row, panels):
            ax.imshow(picture)
            ax.set_title(label, fontsize=9)
            ax.set_axis_off()
    handles = [Patch(color=colours[i], label=name) for i, name in enumerate(class_names) if i > 0]
    figure.legend(handles=handles, loc="lower center", ncol=max(len(handles), 1), fontsize=8)
    if title:
        figure.suptitle(title, fontsize=10)
    return save_png(figure, path)


__all__ = ["IGNORE_INDEX", "TARGETS", "SegmentationPair", "read_class_mask", "segmentation_pairs", "class_ids",
           "remap_classes", "confusion_matrix", "scores_from_confusion", "segmentation_scores",
           "save_segmentation_overlay"]  # fmt: skip
