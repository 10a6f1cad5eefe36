"""Where training tiles come from: slide inputs are tiled first (reused when rerun), any other tile
source is passed on to `histomim.data.tiles.load_tile_dataset` as it is.

    tiles = prepare_tiles(["slides/"], tile_dir, mpp=0.5, tile_size=224, accelerator=accelerator)
    dataset = load_tile_dataset(tiles.source, transform=...)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .slides import PLAIN_IMAGE_EXTENSIONS, SLIDE_EXTENSIONS
from .tiling import TileFolder, is_saved_dataset

WHOLE_SLIDE_EXTENSIONS = tuple(e for e in SLIDE_EXTENSIONS if e not in PLAIN_IMAGE_EXTENSIONS)


@dataclass
class TileData:
    """Where the training tiles come from, for loading and for the model card."""

    source: str  # what load_tile_dataset reads
    inputs: list[str]  # what the user gave (or the sample slide)
    mpp: float | None  # um/px of the tiles, when known
    tile_size: int | None
    slides: list[str]  # slide ids, when known
    failed_slides: list[str]  # "path: reason" of slides that could not be tiled


def prepare_tiles(inputs: list[str], tile_dir: str | Path, mpp: float, tile_size: int, accelerator) -> TileData:
    """Tile slide inputs into ``tile_dir`` (on the main process; finished slides are reused) or pass one
    tile source on.

    A slide that cannot be read or has no tissue is reported with its path and left out; the run
    stops only if no slide gave tiles.

    Raises:
        ValueError: several tile sources, slides mixed with tile sources, or no tiles from any slide.
    """
    slide_inputs = [p for p in inputs if is_slide_input(Path(p))]
    if not slide_inputs:
        if len(inputs) > 1:
            raise ValueError(f"--data takes slide files/folders or a single tile source, got {inputs}")
        return TileData(source=inputs[0], inputs=inputs, **describe_tiles(Path(inputs[0])))
    if len(slide_inputs) != len(inputs):
        others = [p for p in inputs if p not in slide_inputs]
        raise ValueError(f"--data mixes slides with other tile sources {others}; tile the slides with `histomim tile` first")

    from .tiling import find_slides, tile_slides

    if accelerator.is_main_process:  # tile_slides reports each failed slide by path and goes on
        slides = find_slides(slide_inputs, WHOLE_SLIDE_EXTENSIONS)
        report = tile_slides(slides, tile_dir, mpp=mpp, tile_size=tile_size)
        if report.manifest.empty:
            failures = "; ".join(error["message"] for error in report.errors) or "no tissue found"
            raise ValueError(f"no tiles from {', '.join(slide_inputs)}: {failures}")
    accelerator.wait_for_everyone()
    return TileData(source=str(tile_dir), inputs=inputs, **describe_tiles(Path(tile_dir)))


def describe_tiles(source: Path) -> dict[str, Any]:
    """Resolution, tile size, slides and failed slides of a `tile_slides` folder; unknown for other sources."""
    folder = TileFolder(source)
    tiling = folder.read_config()
    if tiling is None:
        return {"mpp": None, "tile_size": None, "slides": [], "failed_slides": []}
    folder.require_complete()
    return {
        "mpp": tiling["mpp"],
        "tile_size": tiling["tile_size"],
        "slides": folder.slide_ids(),
        "failed_slides": [error["message"] for error in folder.read_errors()],
    }


def is_slide_input(path: Path) -> bool:
    """A whole-slide file, or a folder holding any (and not itself a tile folder or saved dataset)."""
    if path.is_file():
        return path.suffix.lower() in WHOLE_SLIDE_EXTENSIONS
    if not path.is_dir() or TileFolder(path).manifest_path.exists() or is_saved_dataset(path):
        return False
    return any(p.suffix.lower() in WHOLE_SLIDE_EXTENSIONS for p in path.rglob("*") if p.is_file())


__all__ = ["TileData", "prepare_tiles", "describe_tiles", "is_slide_input", "WHOLE_SLIDE_EXTENSIONS"]
