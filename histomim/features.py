"""Tile features from a histomim (or any transformers image) encoder, one safetensors file per slide.

Output per slide: `<out_dir>/<slide_id>.safetensors` with `features` (N, D) float32 and `coords` (N, 2)
int64 level-0 (x, y), in manifest order; or, with ``file_format="h5"``, a CLAM/TRIDENT-style
`<slide_id>.h5` with the same two datasets (`write_h5_features`, `read_h5_features`), so features from
other toolkits' encoders and histomim's are read alike (`load_tile_features`). These files are what MIL and fusion models read
(`histomim.multimodal`), and what survival tables point to in their slide-features column.

Each file's metadata holds a provenance record (`read_feature_provenance`): the encoder (name or path,
revision, hashes of its weights, config and preprocessing), the slide file (`slide_identity`), its
level-0 size, the tiles' mpp and size and a hash of the tile set. A rerun compares it, so features of
another model, other tiles or another slide under the same id are never kept as if they were current.

Under `accelerate launch` (or torchrun) the slides are split across the processes: process ``rank`` of
``world`` extracts ``slides[rank::world]`` on its own device and writes only those files; every process
checks every existing file first, so a stale one stops the run before any process computes anything.

    accelerate launch --multi_gpu --num_processes 2 -m histomim.cli extract --model M --slides slides/ --out F/
"""

from __future__ import annotations

import hashlib
import json
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
    mpp: float | None = None,
    tile_size: int | None = None,
) -> dict[str, Path]:
    """Embed every tile of a tile manifest (or `tile_slides` output folder), or of whole-slide files tiled on
    the fly, with the encoder's pooled output.

    ``tiles``: a tile manifest (DataFrame or parquet), a `histomim tile` folder, a folder of tile images
    (`image_folder_manifest`: one slide per subfolder, or the folder itself; no coordinates), or slide files /
    folders of slides (a path or a list), which are tiled here (`histomim.data.bags.slides_manifest`: tissue detection,
    nothing written) at ``mpp`` um/px and ``tile_size`` px, by default the encoder's ``target_mpp`` and
    ``image_size`` (the resolution it was pretrained at). Every process tiles every slide (tissue detection on
    a low-resolution level is cheap next to the encoder) so that all agree on the split and on stale files.

    Tiles are read from the slides on the fly and preprocessed by the encoder's image processor
    (`image_processor_for`: resized to the encoder's size, or `image_size`, and normalized as it was
    trained): the preprocessing of the model card's `AutoImageProcessor` snippet, so both give the same
    features. A slide whose feature file exists with the same provenance (encoder, slide file, tiles)
    is skipped; each file is written atomically, so an interrupted run never leaves a truncated one and
    a rerun keeps every finished slide.

    ``file_format``: ``"safetensors"`` (default) or ``"h5"`` (CLAM/TRIDENT layout, needs h5py).

    With several processes (`accelerate launch`, torchrun) each extracts its share of the slides
    (``slides[rank::world]``) and records its ``process_index`` in the files' provenance; all return once
    every process has finished.

    Returns: {slide_id: feature file path} for every slide in the manifest (on every process).

    Raises:
        ValueError: a slide id with tiles from two slide files (merged manifests), or without
            ``overwrite``: a feature file in ``out_dir`` made with another encoder, other tiles or
            from another slide file (all are named before anything is computed).
    """
    if file_format not in FEATURE_FILE_FORMATS:
        raise ValueError(f"file_format must be one of {FEATURE_FILE_FORMATS}, got {file_format!r}")
    from accelerate import PartialState
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from .data.slides import open_slide
    from .data.tiles import load_tile_dataset
    from .mim.image_processing_histomim import ProcessorTransform, image_processor_for

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # one process per share of the slides under accelerate launch / torchrun (gloo on CPU); one otherwise
    state = PartialState(cpu=torch.device(device).type == "cpu")
    if state.num_processes > 1 and torch.device(device).type != "cpu":
        device = str(state.device)  # this process's GPU (cuda:<local rank>)
    device_type = torch.device(device).type
    encoder = load_encoder(model_or_path, device)
    config = encoder.config
    size = image_size or config.image_size
    processor = image_processor_for(config, image_size=size)
    transform = ProcessorTransform(processor)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    manifest = read_tile_manifest(tiles, mpp or config.target_mpp or 0.5, tile_size or config.image_size)
    slides = list(manifest.groupby("slide_id", sort=False))
    # every file name first: a crafted slide_id is refused before anything is written
    suffix = ".h5" if file_format == "h5" else ".safetensors"
    targets = {slide_id: child_path(out_dir, f"{slide_id}{suffix}", "the tile manifest's slide_id")
               for slide_id, _ in slides}  # fmt: skip
    # 1. what each file would record; refuse stale files (another model, tiles or slide) before any work
    encoder_record = encoder_provenance(encoder, model_or_path, processor)
    records = {slide_id: {**encoder_record, **tile_set_provenance(slide_id, rows)} for slide_id, rows in slides}
    todo = [slide_id for slide_id, _ in slides if overwrite or not targets[slide_id].exists()]
    if not overwrite:
        stale = {slide_id: changes for slide_id, _ in slides if targets[slide_id].exists()
                 and (changes := _changes_since(targets[slide_id], records[slide_id]))}  # fmt: skip
        if stale:
            raise ValueError(
                f"{out_dir} holds features that are not those of this run; pass --overwrite (overwrite=True) to "
                "re-extract them, or use a new --out folder:\n"
                + "\n".join(f"  {targets[slide_id]}: {'; '.join(changes)}" for slide_id, changes in stale.items())
            )

    # 2. this process's share of the slides: a split of all of them (not of what is left), so that every
    # process computes the same split even while another is already writing its files
    mine = {slide_id for slide_id, _ in slides[state.process_index :: state.num_processes]}
    todo = [slide_id for slide_id in todo if slide_id in mine]
    # 3. extract what is left, one slide (one atomic file) at a time
    rows_of = dict(slides)
    for slide_id in tqdm(todo, desc="extracting features", unit="slide", disable=not state.is_main_process):
        rows = rows_of[slide_id]
        from_images = _is_image_rows(rows)  # the tile images of one folder: no slide, no coordinates
        source = rows["folder"].iloc[0] if from_images else rows.reset_index(drop=True)
        dataset = load_tile_dataset(source, transform=transform)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
        features = []
        for batch in loader:
            pixels = batch["pixel_values"].to(device, non_blocking=True)  # (B, 3, H, W)
            with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=device_type != "cpu"):
                output = encoder(pixels, interpolate_pos_encoding=size != config.image_size)
            features.append(output.pooler_output.float().cpu())  # (B, D)
        tensors = {"features": torch.cat(features)}  # (N, D)
        provenance = {**records[slide_id], "device": str(device), "process_index": state.process_index,
                      "num_processes": state.num_processes}  # fmt: skip
        if not from_images:
            tensors["coords"] = torch.tensor(rows[["x", "y"]].to_numpy(), dtype=torch.int64).contiguous()  # (N, 2)
            with open_slide(rows["path"].iloc[0]) as slide:
                provenance["level0_size"] = list(slide.dimensions)
        attributes = {"slide_id": str(slide_id), "encoder": type(encoder).__name__, PROVENANCE_KEY: json.dumps(provenance)}
        if file_format == "h5":
            write_h5_features(targets[slide_id], tensors["features"], tensors.get("coords"), attributes)
            continue
        with atomic_path(targets[slide_id]) as partial:
            save_file(tensors, str(partial), metadata=attributes)
    state.wait_for_everyone()  # every slide's file exists when any process returns
    return {slide_id: targets[slide_id] for slide_id, _ in slides}


# -- provenance ------------------------------------------------------------------------------------

PROVENANCE_KEY = "provenance"  # safetensors metadata key of a feature file's provenance record (JSON)
# what makes features stale when it changes; the rest (encoder path, device, ...) is for the reader
_COMPARED = {
    "weights_sha256": "encoder weights", "config_sha256": "encoder config",
    "preprocessing_sha256": "preprocessing (--image-size, normalization)", "slide": "slide file",
    "tiles_sha256": "tile set (coordinates, level, read size, tile size, mpp)",
}  # fmt: skip
# config entries that say where or how a model was loaded, not what it computes
_UNCOMPUTED_CONFIG_KEYS = {"_name_or_path", "transformers_version", "_commit_hash", "architectures", "torch_dtype",
                           "dtype", "_attn_implementation", "_attn_implementation_autoset", "attn_implementation"}  # fmt: skip


def _sha256_json(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def encoder_provenance(encoder, source, processor) -> dict:
    """Name or path, revision and hashes of the weights, config and preprocessing of an encoder."""
    config = encoder.config
    if isinstance(source, (str, Path)):
        name = str(Path(source).resolve()) if Path(source).exists() else str(source)  # a folder, or a Hub id
    else:
        name = getattr(config, "_name_or_path", "") or type(encoder).__name__
    weights = hashlib.sha256()
    for key, tensor in sorted(encoder.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        weights.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        weights.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    computed = {k: v for k, v in config.to_dict().items() if k not in _UNCOMPUTED_CONFIG_KEYS}
    return {
        "encoder": name,
        "encoder_class": type(encoder).__name__,
        "revision": getattr(config, "_commit_hash", None),
        "weights_sha256": weights.hexdigest(),
        "config_sha256": _sha256_json(computed),
        "preprocessing_sha256": _sha256_json(processor.to_dict()),
    }


def tile_set_provenance(slide_id: str, rows) -> dict:
    """The slide file (`slide_identity`) and tiles behind one slide's features; for the tile images of a folder
    (`image_folder_manifest`), the folder and each image's name, size and modification time.

    Raises:
        ValueError: the slide id has tiles from two slide files (e.g. two manifests merged).
    """
    from .data.tiling import slide_identity

    if _is_image_rows(rows):
        folder = Path(rows["folder"].iloc[0])
        images = [(str(Path(path).relative_to(folder)), Path(path).stat()) for path in rows["path"]]
        return {
            # the folder's identity, in slide_identity's terms: what its images add up to
            "slide": {"path": str(folder.resolve()), "size": sum(stat.st_size for _, stat in images),
                      "mtime_ns": max(stat.st_mtime_ns for _, stat in images)},  # fmt: skip
            "tiles_sha256": _sha256_json([(name, stat.st_size, stat.st_mtime_ns) for name, stat in images]),
            "tile_count": len(images),
            "tile_names": [name for name, _ in images],  # the file of each row of features, in order
            "mpp": None,
            "tile_size": None,
        }

    paths = sorted({str(Path(p).resolve()) for p in rows["path"]})
    if len(paths) > 1:
        raise ValueError(
            f"slide_id {slide_id!r} has tiles from {len(paths)} slide files ({', '.join(paths)}): a merged manifest "
            "of slides that share an id; give them distinct slide_ids (or extract them into separate --out folders)"
        )
    columns = [c for c in ("x", "y", "level", "read_size", "tile_size", "mpp") if c in rows]
    return {
        "slide": slide_identity(paths[0]),
        "tiles_sha256": _sha256_json([columns, rows[columns].to_numpy().tolist()]),
        "tile_count": len(rows),
        "mpp": sorted(set(rows["mpp"].tolist())) if "mpp" in rows else None,
        "tile_size": sorted(set(rows["tile_size"].tolist())) if "tile_size" in rows else None,
    }


def read_feature_provenance(path: str | Path) -> dict | None:
    """The provenance record of a feature file written by `extract_features`; None if it has none."""
    if Path(path).suffix in H5_SUFFIXES:
        record = read_h5_features(path)[2].get(PROVENANCE_KEY)
    else:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as file:
            record = (file.metadata() or {}).get(PROVENANCE_KEY)
    return json.loads(record) if record else None


def _changes_since(target: Path, record: dict) -> list[str]:
    try:
        previous = read_feature_provenance(target)
    except Exception as error:  # a truncated or foreign file under the name: never "done"
        return [f"unreadable ({type(error).__name__}: {error})"]
    return provenance_changes(previous, record)


def provenance_changes(previous: dict | None, current: dict) -> list[str]:
    """What differs between a feature file's record and this run's, in words; empty if nothing does."""
    from .data.tiling import describe_slide_identity

    if previous is None:
        return ["no provenance record (written before histomim recorded one)"]
    changes = []
    for key, what in _COMPARED.items():
        if previous.get(key) != current[key]:
            if key == "slide":
                before, now = describe_slide_identity(previous.get(key)), describe_slide_identity(current[key])
            else:
                before, now = str(previous.get(key))[:12], str(current[key])[:12]
            changes.append(f"{what}: {before} -> {now}")
    return changes


def read_tile_manifest(tiles, mpp: float | None = None, tile_size: int | None = None):
    """A tile manifest DataFrame from a DataFrame, a manifest parquet, a `tile_slides` output folder, a folder
    of tile images, or slide files / folders of slides tiled here at ``mpp`` um/px and ``tile_size`` px."""
    import pandas as pd

    from .data.bags import slides_manifest
    from .data.sources import is_slide_input
    from .data.tiling import TileFolder

    if isinstance(tiles, pd.DataFrame):
        manifest = tiles
    elif isinstance(tiles, (list, tuple)) or is_slide_input(Path(tiles)):
        if mpp is None or tile_size is None:
            raise ValueError(f"{tiles}: slides are tiled on the fly only at a given mpp and tile_size")
        manifest = slides_manifest([tiles] if isinstance(tiles, (str, Path)) else tiles, mpp, tile_size)
    elif _is_image_folder(Path(tiles)):
        return image_folder_manifest(tiles)
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


def _is_image_folder(path: Path) -> bool:
    """A folder of tile images: no tile manifest, saved dataset or parquet files, and some images."""
    from .data.tiles import image_files
    from .data.tiling import TileFolder, is_saved_dataset

    if not path.is_dir() or TileFolder(path).manifest_path.exists() or is_saved_dataset(path):
        return False
    return not any(path.rglob("*.parquet")) and bool(image_files(path))


def _is_image_rows(rows) -> bool:
    return "folder" in rows and "x" not in rows


def image_folder_manifest(folder: str | Path):
    """The slides of a folder of tile images, as rows ``(slide_id, folder, path)``, one per image in reading order.

    Each subfolder holding images is one slide, named after it (its images found recursively); a folder whose
    images all lie directly in it is one slide named after the folder. Such features have no coordinates.

    Raises:
        ValueError: images directly in a folder that also has slide subfolders (whose slide would they be?).
    """
    import pandas as pd

    from .data.tiles import image_files

    folder = Path(folder)
    subfolders = [p for p in sorted(folder.iterdir()) if p.is_dir() and image_files(p)]
    loose = [p for p in image_files(folder) if p.parent == folder]
    if subfolders and loose:
        raise ValueError(
            f"{folder}: {len(loose)} images (e.g. {loose[0].name}) lie beside the slide subfolders "
            f"{', '.join(p.name for p in subfolders[:3])}{', ...' if len(subfolders) > 3 else ''}: put them in a "
            "subfolder of their own (one subfolder per slide)"
        )
    rows = [{"slide_id": slide.name, "folder": str(slide), "path": str(image)}
            for slide in (subfolders or [folder]) for image in image_files(slide)]  # fmt: skip
    return pd.DataFrame(rows)


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
    if path.suffix not in TILE_FEATURE_SUFFIXES:
        raise ValueError(f"{path}: tile features must be one of {TILE_FEATURE_SUFFIXES}")
    try:
        if path.suffix == ".npy":
            tensors = {"features": torch.from_numpy(np.load(path, allow_pickle=False))}
        elif path.suffix in H5_SUFFIXES:
            features, coords, _ = read_h5_features(path)
            tensors = {"features": features, **({"coords": coords} if coords is not None else {})}
        else:
            from safetensors.torch import load_file

            tensors = load_file(str(path))
    except Exception as error:  # numpy and safetensors raise many types for damaged or foreign files
        raise ValueError(f"{path}: cannot read tile features: {type(error).__name__}: {error}") from error
    if "features" in tensors:
        features = tensors["features"]
    elif len(tensors) == 1:
        features = next(iter(tensors.values()))
    else:
        raise ValueError(f"{path}: expected a 'features' tensor or a single tensor, found {sorted(tensors)}")
    if features.ndim != 2:
        raise ValueError(f"{path}: tile features must have shape (N, D), got {tuple(features.shape)}")
    features = features.float()
    # one NaN tile would turn its patient's attention pooling, and through training every risk, into NaN
    bad_tiles = torch.nonzero(~torch.isfinite(features).all(dim=1)).flatten()  # (n_bad,)
    if len(bad_tiles):
        more = f" (and {len(bad_tiles) - 1} more tile(s))" if len(bad_tiles) > 1 else ""
        tile = int(bad_tiles[0])
        where = f" at level-0 (x, y) {tuple(tensors['coords'][tile].tolist())}" if "coords" in tensors else ""
        raise ValueError(f"{path}: tile {tile}{where} has non-finite features (NaN or inf){more}")
    return features


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


__all__ = ["extract_features", "image_folder_manifest", "load_tile_features", "load_encoder", "read_tile_manifest", "read_feature_provenance", "write_h5_features",
           "read_h5_features", "TILE_FEATURE_SUFFIXES", "FEATURE_FILE_FORMATS"]  # fmt: skip
