"""Nucleus centres found without labels: the hematoxylin-dense blobs of an H&E image, and tiles cut around them.

    centres = find_nuclei(image)                       # (N, 2) x, y in pixels of ``image``
    count = cut_nucleus_tiles(image, "tiles/", "HE", size=40)

Hematoxylin stains chromatin, so after colour deconvolution (`rgb_to_hed`, Ruifrok & Johnston) nuclei are the
bright blobs of the H channel. The channel is smoothed below a nucleus' scale; a centre is a local maximum (``min_distance`` px
apart) of its contrast to a wider neighbourhood (a difference of Gaussians), on stained tissue (above Otsu's
threshold of the smoothed channel, which separates tissue from the white background).
No label is used: this is how pretraining tiles can be framed like nucleus crops (`histomim.evaluation.recipe`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from .transforms import rgb_to_hed

# at 40x (about 0.25 um/px) a nucleus is some 15-30 px across: smooth below that, keep centres apart by about half
# of it and compare with the surroundings 5x wider. Chosen on the instance maps (not the types) of the three
# labelled cellseg patches: 96-100 % of the centres inside a nucleus on the two fully annotated ones, 85-95 % of
# their nuclei found (tests/test_nuclei.py)
NUCLEUS_SIGMA, NUCLEUS_MIN_DISTANCE, BACKGROUND_SCALE = 3.0, 8, 5.0


def hematoxylin(image: Image.Image) -> np.ndarray:
    """The hematoxylin concentration of every pixel of an RGB image, (H, W) float32."""
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)  # (3, H, W)
    return rgb_to_hed(pixels)[0].numpy()


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """The threshold that maximises the between-class variance of ``values`` (Otsu, 1979)."""
    counts, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    below = np.cumsum(counts)  # pixels at or below each bin
    above = below[-1] - below
    mean_below = np.cumsum(counts * centres) / np.maximum(below, 1)
    mean_above = ((counts * centres).sum() - np.cumsum(counts * centres)) / np.maximum(above, 1)
    between = below * above * (mean_below - mean_above) ** 2
    return float(centres[np.argmax(between)])


def find_nuclei(
    image: Image.Image, sigma: float = NUCLEUS_SIGMA, min_distance: int = NUCLEUS_MIN_DISTANCE
) -> np.ndarray:
    """(N, 2) integer (x, y) centres of the hematoxylin-dense blobs of ``image``, most contrasted first."""
    if image.width < 2 or image.height < 2:
        raise ValueError(f"find_nuclei needs an image of at least 2 x 2 px, got {image.width} x {image.height}")
    stain = hematoxylin(image)  # (H, W)
    density = ndimage.gaussian_filter(stain, sigma)
    # a blob: denser than its surroundings (difference of Gaussians), on stained tissue rather than background
    contrast = density - ndimage.gaussian_filter(stain, BACKGROUND_SCALE * sigma)
    peaks = (contrast == ndimage.maximum_filter(contrast, size=2 * min_distance + 1)) & (contrast > 0)
    peaks &= density > otsu_threshold(density)
    ys, xs = np.nonzero(peaks)
    order = np.argsort(-contrast[ys, xs], kind="stable")
    return np.stack([xs[order], ys[order]], axis=1)


def cut_nucleus_tiles(image: Image.Image, out_dir: str | Path, name: str, size: int) -> int:
    """A ``size`` px PNG centred on each nucleus of ``image`` whose tile lies inside it, named
    ``<name>_nucleus<size>_<x>_<y>.png`` (reused if present); returns how many."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    half, count = size // 2, 0
    for x, y in find_nuclei(image):
        left, top = int(x) - half, int(y) - half
        if left < 0 or top < 0 or left + size > image.width or top + size > image.height:
            continue  # a centre nearer the border than half a tile: no whole tile around it
        target = out_dir / f"{name}_nucleus{size}_{x}_{y}.png"
        if not target.exists():
            image.crop((left, top, left + size, top + size)).save(target)
        count += 1
    return count


__all__ = ["hematoxylin", "otsu_threshold", "find_nuclei", "cut_nucleus_tiles"]
