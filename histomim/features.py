"""Tile features from a histomim (or any transformers image) encoder, one safetensors file per slide.

Output per slide: `<out_dir>/<slide_id>.safetensors` with `features` (N, D) float32 and `coords` (N, 2)
int64 level-0 (x, y), in manifest order; or, with ``file_format="h5"``, a CLAM/TRIDENT-style
`<slide_id>.h5` with the same two datasets (`write_h5_features`, `read_h5_features`), so features from
other toolkits' encoders and histomim's are read alike (`load_tile_features`). These files are what MIL and fusion models read
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
    file_format: str = "safetensors",
) -> dict[str, Path]:
    """Embed every tile of a tile manifest (or `tile_slides` output folder) with the encoder's pooled output.

    Tiles are read from the slides on the fly and preprocessed by the encoder's image processor
    (`image_processor_for`: resized to the encoder's size, or `image_size`, and normalized as it was
    trained): the preprocessing of the model card's `AutoImageProcessor` snippet, so both give the same
    features. Slides whose feature file exists are skipped unless `overwrite`; each file is written
    atomically, so an interrupted run never leaves a truncated one.

    ``file_format``: ``"safetensors"`` (default) or ``"h5"`` (CLAM/TRIDENT layout, needs h5py).

    Returns: {slide_id: feature file path} for every slide in the manifest.
    """
    if file_format not in FEATURE_FILE_FORMATS:
        raise ValueError(f"file_format must be one of {FEATURE_FILE_FORMATS}, got {file_format!r}")
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
    suffix = ".h5" if file_format == "h5" else ".safetensors"
    targets = {slide_id: child_path(out_dir, f"{slide_id}{suffix}", "the tile manifest's slide_id")
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
        if file_format == "h5":
            write_h5_features(target, torch.cat(features), coords,
                              {"slide_id": str(slide_id), "encoder": type(encoder).__name__})  # fmt: skip
            continue
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
        manifest = pd.read_parquet(path)
    missing = {"slide_id", "x", "y", "path"} - set(manifest.columns)
    if missing:
        raise ValueError(f"tile manifest lacks columns {sorted(missing)}")
    if manifest.empty:
        raise ValueError("tile manifest has no tiles")
    return manifest


FEATURE_FILE_FORMATS = ("safetensors", "h5")
H5_SUFFIXES = (".h5", ".hdf5")
TILE_FEATURE_SUFFIXES = (".safetensors", ".npy") + H5_SUFFIXES


def load_tile_features(path: str | Path) -> torch.Tensor:
    """Tile features (N, D) float32 from a file written by `extract_features` (its `features` tensor),
    a safetensors file holding one tensor, a CLAM/TRIDENT h5 file (`read_h5_features`) or a `.npy` array."""
    import numpy as np

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tile feature file not found: {path}")
    if path.suffix == ".npy":
        features = torch.from_numpy(np.load(path, allow_pickle=False))
    elif path.suffix in H5_SUFFIXES:
        features = read_h5_features(path)[0]
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


def write_h5_features(path: str | Path, features: torch.Tensor, coords: torch.Tensor | None = None,
                      attributes: dict | None = None) -> Path:  # fmt: skip
    """Write tile features as CLAM/TRIDENT do: an h5 file with datasets `features` (N, D) float32 and
    `coords` (N, 2) int64 level-0 (x, y), plus `attributes` as file attributes; atomically."""
    import h5py

    features = torch.as_tensor(features).float()
    if features.ndim != 2:
        raise ValueError(f"{path}: tile features must have shape (N, D), got {tuple(features.shape)}")
    if coords is not None and tuple(coords.shape) != (len(features), 2):
        raise ValueError(f"{path}: coords must have shape ({len(features)}, 2), got {tuple(coords.shape)}")
    path = Path(path)
    with atomic_path(path) as partial, h5py.File(partial, "w") as file:
        file.create_dataset("features", data=features.numpy())
        if coords is not None:
            file.create_dataset("coords", data=torch.as_tensor(coords).to(torch.int64).numpy())
        for key, value in (attributes or {}).items():
            file.attrs[key] = value
    return path


def read_h5_features(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """(features (N, D) float32, coords (N, 2) int64 or None, file attributes) of a CLAM/TRIDENT-style h5 file.

    A leading batch axis of one, as some exporters write ((1, N, D), (1, N, 2)), is dropped.
    """
    import h5py

    path = Path(path)
    with h5py.File(path, "r") as file:
        if "features" not in file:
            raise ValueError(f"{path}: no 'features' dataset (found {sorted(file.keys())})")
        features = torch.from_numpy(file["features"][()]).float()
        coords = torch.from_numpy(file["coords"][()]).to(torch.int64) if "coords" in file else None
        attributes = {key: (value.decode() if isinstance(value, bytes) else value) for key, value in file.attrs.items()}
    if features.ndim == 3 and features.shape[0] == 1:
        features = features[0]
        coords = coords[0] if coords is not None and coords.ndim == 3 else coords
    if features.ndim != 2:
        raise ValueError(f"{path}: 'features' must have shape (N, D), got {tuple(features.shape)}")
    if coords is not None and tuple(coords.shape) != (len(features), 2):
        raise ValueError(f"{path}: 'coords' has shape {tuple(coords.shape)}, expected ({len(features)}, 2)")
    return features, coords, attributes


__all__ = ["extract_features", "load_tile_features", "load_encoder", "write_h5_features", "read_h5_features",
           "TILE_FEATURE_SUFFIXES", "FEATURE_FILE_FORMATS"]  # fmt: skip
