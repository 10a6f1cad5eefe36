"""Shared fixtures: real tissue tiles from the CMU-1 sample slide and tiny model configurations."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import histomim
from histomim import HistoMIMConfig

# Test models are tiny: one thread is faster than two, and far faster on a loaded machine.
torch.set_num_threads(1)


def tiny_config(**overrides) -> HistoMIMConfig:
    """A ViT small enough for CPU tests: 64 px images, 16 patches, 2 blocks."""
    settings = dict(
        image_size=64, patch_size=16, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=4,
    )
    settings.update(overrides)
    return HistoMIMConfig(**settings)


def save_tiny_encoder(folder, seed: int):
    """A seeded tiny histomim encoder for 32 px crops, saved with its image processor (no card)."""
    from histomim import HistoMIMModel, image_processor_for

    torch.manual_seed(seed)
    model = HistoMIMModel(tiny_config(image_size=32, patch_size=8))
    model.save_pretrained(folder)
    image_processor_for(model.config).save_pretrained(folder)
    return folder


def make_hub_cache(folder: Path, cache: Path, repo_id: str) -> None:
    """Lay `folder` out as the Hub's own cache does: blobs, a snapshot of symlinks, refs/main."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for index, file in enumerate(sorted(folder.iterdir())):
        if file.is_file():
            blob = repo / "blobs" / f"blob{index:04d}"
            shutil.copy(file, blob)
            (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))


@pytest.fixture(scope="session")
def sample_slide_path():
    from histomim.data.samples import sample_slide_path as fetch

    return fetch()


@pytest.fixture(scope="session")
def tissue_tiles(sample_slide_path) -> torch.Tensor:
    """(32, 3, 64, 64) normalized tiles of real H&E tissue: 128 px regions at 0.5 um/px, downsampled 2x
    (~1 um/px), kept where more than half of the pixels are saturated (tissue, not glass)."""
    import tiffslide
    from PIL import Image

    slide = tiffslide.TiffSlide(sample_slide_path)
    width, height = slide.dimensions
    region = np.asarray(slide.read_region((0, 0), 0, (width, height)).convert("RGB"))
    tiles = []
    for y in range(0, height - 128, 128):
        for x in range(0, width - 128, 128):
            patch = region[y : y + 128, x : x + 128]
            rgb = patch.astype(np.float32) / 255
            saturation = (rgb.max(-1) - rgb.min(-1)) / np.maximum(rgb.max(-1), 1e-6)
            if (saturation > 0.15).mean() > 0.5:
                tiles.append(np.asarray(Image.fromarray(patch).resize((64, 64), Image.BICUBIC)))
    assert len(tiles) >= 32, f"expected tissue in the sample slide, found {len(tiles)} tiles"
    rng = np.random.default_rng(0)
    chosen = np.stack([tiles[i] for i in rng.choice(len(tiles), 32, replace=False)])
    pixels = torch.from_numpy(chosen).permute(0, 3, 1, 2).float() / 255  # (32, 3, 64, 64)
    mean = torch.tensor(histomim.mim.configuration_histomim.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(histomim.mim.configuration_histomim.IMAGENET_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


COLOUR_TILE = 32


def colour_features(rgb: np.ndarray) -> np.ndarray:
    """(n, 9) features of the tissue tiles of an RGB image: mean/std of H, E, DAB stain density, mean RGB."""
    from skimage.color import rgb2hed

    rows, cols = rgb.shape[0] // COLOUR_TILE, rgb.shape[1] // COLOUR_TILE
    tiles = rgb[: rows * COLOUR_TILE, : cols * COLOUR_TILE].reshape(rows, COLOUR_TILE, cols, COLOUR_TILE, 3).swapaxes(1, 2).reshape(-1, COLOUR_TILE, COLOUR_TILE, 3)
    scaled = tiles.astype(np.float32) / 255
    saturation = (scaled.max(-1) - scaled.min(-1)) / np.maximum(scaled.max(-1), 1e-6)
    tiles = tiles[(saturation > 0.15).mean(axis=(1, 2)) > 0.5]  # tissue, not glass
    hed = rgb2hed(tiles.reshape(-1, COLOUR_TILE, 3)).reshape(len(tiles), -1, 3) * 10  # (n, T*T, 3) stain densities
    rgb_mean = tiles.reshape(len(tiles), -1, 3).mean(axis=1) / 255
    return np.concatenate([hed.mean(axis=1), hed.std(axis=1), rgb_mean], axis=1).astype(np.float32)
