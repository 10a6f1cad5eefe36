"""Slides -> tissue -> tiles -> datasets. Heavy readers (tiffslide, openslide, datasets) load lazily."""

from .slides import Slide, SlideError, open_slide
from .tiles import load_tile_dataset, read_tile
from .tiling import tile_slides
from .tissue import detect_tissue, save_tissue_overlay
from .transforms import eval_transform, hed_jitter_batch, pretrain_transform

__all__ = [
    "Slide", "SlideError", "open_slide", "detect_tissue", "save_tissue_overlay", "tile_slides",
    "load_tile_dataset", "read_tile", "pretrain_transform", "eval_transform", "hed_jitter_batch",
]
