"""Tissue detection on a low-resolution copy of a slide, and a PNG overlay to check it by eye.

Stained tissue is coloured while glass, background and black scanner borders are grey, so an
Otsu threshold on HSV saturation separates them; morphology then closes gaps between cells,
fills small holes and drops specks of dust. Marker ink is saturated too: its pixels
(`histomim.data.quality.pen_mask_from_rgb`) are taken out of the mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .quality import pen_mask_from_rgb
from .slides import Slide, SlideError

if TYPE_CHECKING:
    import pandas as pd


class NoTissueError(SlideError):
    """Tissue detection found nothing on the slide."""


@dataclass(frozen=True)
class TissueMask:
    """Where the tissue is, on a grid ``downsample`` times coarser than level 0."""

    mask: np.ndarray  # (h, w) bool, True = tissue
    downsample: float  # level-0 pixels per mask pixel
    mpp: float | None  # level-0 um/px of the slide, if known
    threshold: float  # saturation threshold that was used
    thumbnail: np.ndarray | None = None  # (h, w, 3) uint8 the mask was found on; the overlay reuses it

    @property
    def fraction(self) -> float:
        """Share of the slide area that is tissue, in [0, 1]."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    @property
    def is_empty(self) -> bool:
        return not self.mask.any()

    @property
    def area_um2(self) -> float | None:
        """Tissue area in square micrometres, or None without mpp."""
        if self.mpp is None:
            return None
        return float(self.mask.sum()) * (self.downsample * self.mpp) ** 2

    def region_fractions(self, xs: np.ndarray, ys: np.ndarray, size: float) -> np.ndarray:
        """Tissue fraction of each square level-0 box ``(x, y, size, size)``; vectorised.

        Boxes are snapped outwards to mask pixels and sums come from an integral image, so a
        grid of a million tiles costs a few array operations.
        """
        height, width = self.mask.shape
        integral = np.zeros((height + 1, width + 1), dtype=np.int64)
        integral[1:, 1:] = self.mask.cumsum(0).cumsum(1)
        left = np.clip(np.floor(np.asarray(xs) / self.downsample).astype(int), 0, width)
        top = np.clip(np.floor(np.asarray(ys) / self.downsample).astype(int), 0, height)
        right = np.clip(np.ceil((np.asarray(xs) + size) / self.downsample).astype(int), 0, width)
        bottom = np.clip(np.ceil((np.asarray(ys) + size) / self.downsample).astype(int), 0, height)
        tissue = integral[bottom, right] - integral[top, right] - integral[bottom, left] + integral[top, left]
        area = np.maximum((right - left) * (bottom - top), 1)
        return tissue / area


def tissue_mask_from_rgb(
    rgb: np.ndarray,
    min_saturation: float = 0.05,
    max_saturation: float = 0.15,
    closing_radius: int = 2,
    min_object_px: int = 64,
    min_hole_px: int = 64,
) -> tuple[np.ndarray, float]:
    """Tissue mask of an RGB image, without marker ink; returns ``(mask (h, w) bool, saturation threshold)``.

    Args:
        rgb: (h, w, 3) uint8.
        min_saturation, max_saturation: bounds on the Otsu threshold. The floor makes a blank
            image (where Otsu would split sensor noise) come out empty; the ceiling keeps pale
            tissue when the field holds no glass (where Otsu would split dark from pale stain).
        closing_radius: disk radius (px) of the morphological closing that joins nearby nuclei.
        min_object_px, min_hole_px: connected tissue pieces / holes smaller than this are dropped / filled.
    """
    from skimage.color import rgb2hsv
    from skimage.filters import threshold_otsu
    from skimage.morphology import closing, disk

    saturation = rgb2hsv(rgb)[..., 1]  # (h, w) in [0, 1]
    threshold = min(max(float(threshold_otsu(saturation)), min_saturation), max_saturation)
    mask = saturation > threshold
    if closing_radius > 0:
        mask = closing(mask, disk(closing_radius)).astype(bool)
    mask = ~_drop_small_components(~mask, min_hole_px)
    mask &= ~pen_mask_from_rgb(rgb)  # after the closing, which would bridge thin strokes again
    mask = _drop_small_components(mask, min_object_px)
    return mask, threshold


def _drop_small_components(mask: np.ndarray, min_px: int) -> np.ndarray:
    """Remove 8-connected True components with fewer than ``min_px`` pixels."""
    from skimage.measure import label

    if min_px <= 1 or not mask.any():
        return mask
    labels = label(mask, connectivity=2)  # (h, w) int, 0 = background
    keep = np.bincount(labels.ravel()) >= min_px
    keep[0] = False
    return keep[labels]


def detect_tissue(slide: Slide, mask_mpp: float = 4.0, max_size: int = 4096, **mask_kwargs) -> TissueMask:
    """Detect tissue on a thumbnail of ``slide``.

    The thumbnail has ``mask_mpp`` um/px when the slide's mpp is known (so the morphology sizes
    in `tissue_mask_from_rgb` are physical: 64 px at 4 um/px is 0.001 mm^2), never more than
    ``max_size`` px on its longer side, and is never upsampled. An empty mask is returned, not
    raised; callers that need tissue check `TissueMask.is_empty` (see `require_tissue`).
    """
    width, height = slide.dimensions
    downsample = mask_mpp / slide.mpp if slide.mpp is not None else 1.0
    downsample = max(downsample, max(width, height) / max_size, 1.0)
    thumbnail = slide.thumbnail(round(max(width, height) / downsample))  # (h, w, 3)
    mask, threshold = tissue_mask_from_rgb(thumbnail, **mask_kwargs)
    # the thumbnail is rounded to whole pixels; the mean per-axis scale is exact to < 1 mask px
    actual_downsample = (width / mask.shape[1] + height / mask.shape[0]) / 2
    return TissueMask(mask=mask, downsample=actual_downsample, mpp=slide.mpp, threshold=threshold, thumbnail=thumbnail)


def require_tissue(slide: Slide, tissue: TissueMask) -> TissueMask:
    """Return ``tissue``, or raise `NoTissueError` naming the slide if it is empty."""
    if tissue.is_empty:
        raise NoTissueError(
            f"{slide.path}: no tissue detected (no pixels above saturation {tissue.threshold:.3f} on a "
            f"{tissue.mask.shape[1]}x{tissue.mask.shape[0]} thumbnail); blank, black or unstained slide?"
        )
    return tissue


def save_tissue_overlay(
    slide: Slide, tissue: TissueMask, png_path: str | Path, tiles: pd.DataFrame | None = None
) -> Path:
    """Write a PNG of the thumbnail with the tissue tinted and outlined (and tile boxes, if given).

    Args:
        tiles: optional manifest (columns x, y, level, read_size) whose tiles are drawn as boxes.
    """
    from matplotlib.patches import Rectangle

    from ..plotting import new_figure, save_png

    png_path = Path(png_path)
    height, width = tissue.mask.shape
    # the thumbnail the mask came from, not a second pass over the slide (all of level 0 without a pyramid)
    thumbnail = tissue.thumbnail if tissue.thumbnail is not None else slide.thumbnail(max(width, height))  # (h, w, 3)

    figure = new_figure(figsize=(8, 8 * height / width + 0.6))  # no pyplot: safe in worker threads and processes
    axes = figure.add_subplot()
    axes.imshow(thumbnail)
    if not tissue.is_empty:
        tint = np.zeros((height, width, 4))
        tint[tissue.mask] = (0.0, 0.8, 0.2, 0.15)  # translucent green over tissue
        axes.imshow(tint)
        axes.contour(tissue.mask, levels=[0.5], colors="lime", linewidths=1)
    if tiles is not None and len(tiles):
        level_downsamples = np.asarray(slide.level_downsamples)
        sizes = tiles["read_size"].to_numpy() * level_downsamples[tiles["level"].to_numpy()] / tissue.downsample
        for x, y, size in zip(tiles["x"] / tissue.downsample, tiles["y"] / tissue.downsample, sizes):
            axes.add_patch(Rectangle((x, y), size, size, fill=False, edgecolor="royalblue", linewidth=0.5))
    area = f", {tissue.area_um2 / 1e6:.2f} mm²" if tissue.area_um2 is not None else ""
    status = "NO TISSUE DETECTED" if tissue.is_empty else f"tissue {tissue.fraction:.1%}{area}"
    n_tiles = f", {len(tiles)} tiles" if tiles is not None else ""
    axes.set_title(f"{slide.slide_id}: {status}{n_tiles}", fontsize=10)
    axes.set_axis_off()
    figure.tight_layout()

    return save_png(figure, png_path)
