"""Tile quality: pen ink, focus and brightness scores, so that marker strokes and blurred fields are not tissue.

Pathologists circle regions with blue, green or black markers. Ink is as saturated as stain, so the
saturation threshold of `histomim.data.tissue` alone takes it for tissue; its hue and darkness tell it
apart from haematoxylin (purple-blue, hue above ~235 degrees) and eosin (pink).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

    from .slides import Slide

# HSV bounds of marker ink (hue in degrees, saturation and value in [0, 1]). Blue stops below the hue of
# haematoxylin; black ink is grey-black, while the darkest nuclei (value ~0.1-0.2) stay saturated purple.
BLUE_INK_HUE = (180.0, 235.0)
GREEN_INK_HUE = (70.0, 180.0)
BLUE_INK_MIN_SATURATION = 0.5
GREEN_INK_MIN_SATURATION = 0.3
COLOURED_INK_MIN_VALUE = 0.2  # below this, hue and saturation are sensor noise
BLACK_INK_MAX_VALUE = 0.25
BLACK_INK_MAX_SATURATION = 0.4


class TileQuality(NamedTuple):
    """The scores of one tile; each is a manifest column of the same name."""

    pen_fraction: float  # share of pixels that are marker ink, in [0, 1]
    focus: float  # variance of the Laplacian of the grey image (0-255 scale): low = blurred or empty
    brightness: float  # mean grey level in [0, 1]: 1 = white glass, 0 = black


def pen_mask_from_rgb(rgb: np.ndarray) -> np.ndarray:
    """Pixels of blue, green or black marker ink in an (h, w, 3) uint8 RGB image; (h, w) bool."""
    from skimage.color import rgb2hsv

    hsv = rgb2hsv(rgb)  # (h, w, 3) in [0, 1]
    hue, saturation, value = hsv[..., 0] * 360, hsv[..., 1], hsv[..., 2]
    lit = value > COLOURED_INK_MIN_VALUE
    blue = (hue >= BLUE_INK_HUE[0]) & (hue < BLUE_INK_HUE[1]) & (saturation > BLUE_INK_MIN_SATURATION) & lit
    green = (hue >= GREEN_INK_HUE[0]) & (hue < GREEN_INK_HUE[1]) & (saturation > GREEN_INK_MIN_SATURATION) & lit
    black = (value < BLACK_INK_MAX_VALUE) & (saturation < BLACK_INK_MAX_SATURATION)
    return blue | green | black


def tile_quality(rgb: np.ndarray) -> TileQuality:
    """Pen fraction, focus and brightness of an (h, w, 3) uint8 RGB tile."""
    from scipy.ndimage import laplace

    grey = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])  # (h, w) luma, 0-255
    return TileQuality(
        pen_fraction=float(pen_mask_from_rgb(rgb).mean()),
        focus=float(laplace(grey).var()),
        brightness=float(grey.mean() / 255),
    )


def score_tiles(slide: Slide, manifest: pd.DataFrame, workers: int = 1, progress: bool = False) -> pd.DataFrame:
    """``manifest`` with the `TileQuality` columns, from each tile as the model will see it (read in threads)."""
    from concurrent.futures import ThreadPoolExecutor

    import pandas as pd
    from tqdm.auto import tqdm

    def score(row) -> TileQuality:
        tile = slide.read_tile((row.x, row.y), row.level, row.read_size, row.tile_size)
        return tile_quality(np.asarray(tile))  # (tile_size, tile_size, 3)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        rows = manifest.itertuples(index=False)
        bar = tqdm(pool.map(score, rows), total=len(manifest), desc=f"scoring {slide.slide_id}", unit="tile",
                   leave=False, disable=not progress)  # fmt: skip
        scores = pd.DataFrame(list(bar), columns=list(TileQuality._fields), index=manifest.index, dtype="float64")
    return pd.concat([manifest, scores], axis=1)


def check_quality_bounds(
    max_pen_fraction: float, min_focus: float, min_brightness: float, max_brightness: float
) -> None:
    """Refuse filter bounds that are out of range, naming the argument and its command-line flag."""
    if not 0 <= max_pen_fraction <= 1:
        raise ValueError(f"max_pen_fraction (--max-pen-fraction) must be in [0, 1], got {max_pen_fraction}")
    if not min_focus >= 0:
        raise ValueError(f"min_focus (--min-focus) must be >= 0, got {min_focus}")
    if not 0 <= min_brightness <= max_brightness <= 1:
        raise ValueError(
            f"brightness bounds must satisfy 0 <= min_brightness (--min-brightness) <= max_brightness "
            f"(--max-brightness) <= 1, got {min_brightness} and {max_brightness}"
        )


__all__ = ["TileQuality", "check_quality_bounds", "pen_mask_from_rgb", "score_tiles", "tile_quality"]
