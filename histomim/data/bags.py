"""Bags of tile pixels for end-to-end MIL: the tiles of a slide (tiled on the fly), a `histomim tile` folder, a
tile manifest or a folder of tile images, preprocessed for one encoder.

    processor = image_processor_for(encoder.config)
    bag = tile_bag("slide.svs", processor, mpp=0.5, tile_size=224, max_tiles=16)   # (16, 3, 224, 224)

A bag is what `HistoFusionForSurvival` takes per patient when its histology path is a ViT
(`config.histology_encoder`) instead of precomputed features.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .sources import WHOLE_SLIDE_EXTENSIONS, is_slide_input


def spread_indices(num_tiles: int, max_tiles: int | None) -> np.ndarray:
    """``max_tiles`` indices spread evenly over ``range(num_tiles)`` (all when there are fewer).

    Deterministic on purpose: a patient's bag must be the same tiles at fit and at predict time. Manifests
    are in row-major slide order, so evenly spaced rows are spread over the tissue.
    """
    if max_tiles is None or num_tiles <= max_tiles:
        return np.arange(num_tiles)
    return np.unique(np.linspace(0, num_tiles - 1, max_tiles).round().astype(np.int64))


def slide_manifest(path: str | Path, mpp: float, tile_size: int):
    """The tissue tiles of one slide at ``mpp`` um/px and ``tile_size`` px, as a tile manifest."""
    from .slides import open_slide
    from .tiling import tile_manifest
    from .tissue import detect_tissue, require_tissue

    with open_slide(path) as slide:
        slide.require_mpp()
        tissue = require_tissue(slide, detect_tissue(slide))
        manifest = tile_manifest(slide, tissue, mpp=mpp, tile_size=tile_size)
    if manifest.empty:
        raise ValueError(f"{path}: no {tile_size} px tile at {mpp} um/px is mostly tissue")
    return manifest


def slides_manifest(inputs, mpp: float, tile_size: int):
    """The tissue tiles of slide files and folders of slides (tiled here, nothing written), as one manifest.

    Raises:
        FileNotFoundError: an input does not exist.
        ValueError: no slide among the inputs, or a slide without mpp metadata, tissue or whole tiles (named).
    """
    import pandas as pd

    from .tiling import find_slides

    slides = find_slides([Path(p) for p in inputs], WHOLE_SLIDE_EXTENSIONS)
    return pd.concat([slide_manifest(slide, mpp, tile_size) for slide in slides], ignore_index=True)


def tile_bag(
    source: str | Path, processor, mpp: float, tile_size: int, max_tiles: int | None = None
) -> torch.Tensor:
    """The preprocessed tiles ``(N, C, H, W)`` of one slide or tile source, at most ``max_tiles`` of them.

    Args:
        source: a whole-slide file or a folder of slides (tiled here at ``mpp`` / ``tile_size``), or anything
            :func:`histomim.data.tiles.load_tile_dataset` reads (a `histomim tile` folder, a manifest parquet,
            a folder of tile images).
        processor: the encoder's image processor (resizing and normalization as it was trained).
    """
    from ..mim.image_processing_histomim import ProcessorTransform
    from .tiles import load_tile_dataset

    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"tile source not found: {path}")
    tiles = path
    if is_slide_input(path):  # a slide, or a folder of a patient's slides
        tiles = slides_manifest([path], mpp, tile_size)
    dataset = load_tile_dataset(tiles, transform=ProcessorTransform(processor))
    if len(dataset) == 0:
        raise ValueError(f"{path}: no tiles")
    return torch.stack([dataset[int(i)]["pixel_values"] for i in spread_indices(len(dataset), max_tiles)])


__all__ = ["slide_manifest", "slides_manifest", "spread_indices", "tile_bag"]
