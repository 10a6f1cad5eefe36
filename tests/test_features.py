"""Feature extraction: tiles of the real sample slide -> one safetensors file per slide."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from histomim import HistoMIMModel
from histomim.data import read_tile, tile_slides
from histomim.data.transforms import eval_transform
from histomim.features import extract_features, load_tile_features

from conftest import tiny_config


@pytest.fixture(scope="module")
def tiled(tmp_path_factory, sample_slide_path):
    out = tmp_path_factory.mktemp("tiles")
    tile_slides([sample_slide_path], out, mpp=1.0, tile_size=64, min_tissue=0.5)
    return out


def test_extract_features_writes_one_file_per_slide_matching_the_encoder(tiled, tmp_path):
    torch.manual_seed(0)
    encoder = HistoMIMModel(tiny_config(pooling="cls+mean")).eval()
    encoder.save_pretrained(tmp_path / "model")
    outputs = extract_features(tmp_path / "model", tiled, tmp_path / "features", batch_size=16)
    manifest = pd.read_parquet(tiled / "manifest.parquet")
    assert set(outputs) == set(manifest.slide_id)
    features = load_tile_features(next(iter(outputs.values())))
    assert features.shape == (len(manifest), 128)  # cls+mean doubles the width

    # the third tile's feature equals the encoder on that tile, preprocessed the same way
    row = manifest.iloc[2]
    pixels = eval_transform(64, encoder.config.image_mean, encoder.config.image_std)(read_tile(row))
    with torch.no_grad():
        expected = encoder(pixels[None]).pooler_output[0]
    torch.testing.assert_close(features[2], expected, atol=1e-5, rtol=1e-5)

    # rerunning skips finished slides
    mtime = outputs[row.slide_id].stat().st_mtime_ns
    extract_features(tmp_path / "model", tiled, tmp_path / "features")
    assert outputs[row.slide_id].stat().st_mtime_ns == mtime


def test_load_tile_features_formats_and_errors(tmp_path):
    array = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    np.save(tmp_path / "a.npy", array)
    save_file({"x": torch.from_numpy(array)}, str(tmp_path / "b.safetensors"))
    for name in ("a.npy", "b.safetensors"):
        assert torch.equal(load_tile_features(tmp_path / name), torch.from_numpy(array))
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        load_tile_features(tmp_path / "missing.npy")
    save_file({"x": torch.zeros(2, 2), "y": torch.zeros(2, 2)}, str(tmp_path / "c.safetensors"))
    with pytest.raises(ValueError, match="c.safetensors"):
        load_tile_features(tmp_path / "c.safetensors")
    with pytest.raises(FileNotFoundError, match="histomim tile"):
        extract_features(HistoMIMModel(tiny_config()), tmp_path / "nothing", tmp_path / "f")
