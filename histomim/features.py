"""Tile features from a histomim (or any transformers image) encoder, one safetensors file per slide.

Output per slide: `<out_dir>/<slide_id>.safetensors` with `features` (N, D) float32 and `coords` (N, 2)
int64 level-0 (x, y), in manifest order. These files are what MIL and fusion models read
(`histomim.multimodal`), and what survival tables point to in their slide-features column.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .atomic import atomic_path
from .paths import child_path


def load_encoder(model_or_path, device: str | torch.device = "cpu"):
    """An encoder in eval mode from a model or a saved folder / Hub id (`AutoModel`)."""
    if isinstance(model_or_path, (str, Path)):
        import histomim  # noqa: F401  (registers the Auto classes)
        from transformers import AutoModel

        model_or_path = AutoModel.from_pretrained(model_or_path)
    return model_or_path.to(device).eval()


@torch.inference_mode()
def extract_features(
    model_or_path,
    tiles,
    out_dir: str | Path,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | None = None,
    image_size: int | None = None,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Embed every tile of a tile manifest (or `tile_slides` output folder) with the encoder's pooled output.

    Tiles are read from the slides on the fly and preprocessed by the encoder's image processor
    (`image_processor_for`: resized to the encoder's size, or `image_size`, and normalized as it was
    trained): the preprocessing of the model card's `AutoImageProcessor` snippet, so both give the same
    features. Slides whose feature file exists are skipped unless `overwrite`; each file is written
    atomically, so an interrupted run never leaves a truncated one.

    Returns: {slide_id: feature file path} for every slide in the manifest.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from .data.tiles import load_tile_dataset
    from .mim.image_processing_histomim import ProcessorTransform, image_processor_for

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    encoder = load_encoder(model_or_path, device)
    config = encoder.config
    size = image_size or config.image_size
    transform = ProcessorTransform(image_processor_for(config, image_size=size))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    manifest = _read_manifest(tiles)
    # every file name first: a crafted slide_id is refused before anything is written
    targets = {slide_id: child_path(out_dir, f"{slide_id}.safetensors", "the tile manifest's slide_id")
               for slide_id in manifest["slide_id"].unique()}  # fmt: skip
    outputs: dict[str, Path] = {}
    for slide_id, rows in tqdm(list(manifest.groupby("slide_id", sort=False)), desc="extracting features", unit="slide"):
        target = targets[slide_id]
        outputs[slide_id] = target
        if target.exists() and not overwrite:
            continue
        dataset = load_tile_dataset(rows.reset_index(drop=True), transform=transform)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
        features = []
        for batch in loader:
            pixels = batch["pixel_values"].to(device, non_blocking=True)  # (B, 3, H, W)
            with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=device != "cpu"):
                output = encoder(pixels, interpolate_pos_encoding=size != config.image_size)
            features.append(output.pooler_output.float().cpu())  # (B, D)
        coords = torch.tensor(rows[["x", "y"]].to_numpy(), dtype=torch.int64).contiguous()  # (N, 2)
        with atomic_path(target) as partial:
            save_file({"features": torch.cat(features), "coords": coords}, str(partial),
                      metadata={"slide_id": str(slide_id), "encoder": type(encoder).__name__})
    return outputs


def _read_manifest(tiles):
    """A tile manifest DataFrame from a DataFrame, a manifest parquet, or a `tile_slides` output folder."""
    import pandas as pd

    from .data.tiling import TileFolder

    if isinstance(tiles, pd.DataFrame):
        manifest = tiles
    else:
        path = Path(tiles)
        path = TileFolder(path).manifest_path if path.is_dir() else path
        if not path.exists():
            raise FileNotFoundError(f"no tile manifest at {path}; run `histomim tile` first")
        tile_folder = TileFolder.containing(path)
        if tile_folder is not None:  # an interrupted tiling run leaves a manifest that lacks slides
            tile_folder.require_complete()
        manifest = pd.read_parquet(path)
    missing = {"slide_id", "x", "y", "path"} - set(manifest.columns)
    if missing:
        raise ValueError(f"tile manifest lacks columns {sorted(missing)}")
    if manifest.empty:
        raise ValueError("tile manifest has no tiles")
    return manifest


TILE_FEATURE_SUFFIXES = (".safetensors", ".npy")


def load_tile_features(path: str | Path) -> torch.Tensor:
    """Tile features (N, D) float32 from a file written by `extract_features` (its `features` tensor),
    a safetensors file holding one tensor, or a `.npy` array."""
    import numpy as np

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tile feature file not found: {path}")
    if path.suffix == ".npy":
        features = torch.from_numpy(np.load(path, allow_pickle=False))
    elif path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        if "features" in tensors:
            features = tensors["features"]
        elif len(tensors) == 1:
            features = next(iter(tensors.values()))
        else:
            raise ValueError(f"{path}: expected a 'features' tensor or a single tensor, found {sorted(tensors)}")
    else:
        raise ValueError(f"{path}: tile features must be one of {TILE_FEATURE_SUFFIXES}")
    if features.ndim != 2:
        raise ValueError(f"{path}: tile features must have shape (N, D), got {tuple(features.shape)}")
    return features.float()


__all__ = ["extract_features", "load_tile_features", "load_encoder", "TILE_FEATURE_SUFFIXES"]
