"""CLAM/TRIDENT-style h5 tile features (`features` (N, D), `coords` (N, 2)): round trip, files written the way
those toolkits write them, `histomim extract --format h5` on the real slide, and h5 files feeding SurvivalEstimator."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

from histomim import HistoMIMModel
from histomim.data import tile_slides
from histomim.features import extract_features, load_tile_features, read_h5_features, write_h5_features


def test_round_trip_keeps_features_coords_and_attributes(tmp_path):
    rng = np.random.default_rng(0)
    features = torch.from_numpy(rng.normal(size=(7, 12)).astype(np.float32))
    coords = torch.from_numpy(rng.integers(0, 10_000, size=(7, 2)))
    path = write_h5_features(tmp_path / "slide.h5", features, coords, {"encoder": "HistoMIMModel", "mpp": 0.5})
    back, back_coords, attributes = read_h5_features(path)
    assert torch.equal(back, features) and torch.equal(back_coords, coords)
    assert attributes == {"encoder": "HistoMIMModel", "mpp": 0.5}
    assert torch.equal(load_tile_features(path), features)
    with pytest.raises(ValueError, match=r"bad.h5: coords must have shape \(7, 2\)"):
        write_h5_features(tmp_path / "bad.h5", features, coords[:3])
    assert not (tmp_path / "bad.h5").exists()


def test_reads_files_laid_out_by_clam_and_trident(tmp_path):
    features = np.arange(20, dtype=np.float32).reshape(5, 4)
    coords = np.arange(10, dtype=np.int32).reshape(5, 2)
    with h5py.File(tmp_path / "clam.h5", "w") as file:  # CLAM: (N, D) float32, (N, 2) int
        file["features"], file["coords"] = features, coords
    with h5py.File(tmp_path / "batched.h5", "w") as file:  # a leading batch axis of one
        file["features"], file["coords"] = features[None], coords[None]
    with h5py.File(tmp_path / "other.h5", "w") as file:
        file["feats"] = features
    for name in ("clam.h5", "batched.h5"):
        read, read_coords, _ = read_h5_features(tmp_path / name)
        np.testing.assert_array_equal(read.numpy(), features)
        np.testing.assert_array_equal(read_coords.numpy(), coords)
    with pytest.raises(ValueError, match=r"other.h5: no 'features' dataset \(found \['feats'\]\)"):
        load_tile_features(tmp_path / "other.h5")


def test_extract_writes_h5_equal_to_safetensors(tmp_path, sample_slide_path):
    from histomim.cli import main

    tiles = tmp_path / "tiles"
    tile_slides([sample_slide_path], tiles, mpp=2.0, tile_size=64, min_tissue=0.5)
    torch.manual_seed(0)
    HistoMIMModel(tiny_config()).save_pretrained(tmp_path / "model")
    safetensors = extract_features(tmp_path / "model", tiles, tmp_path / "st", batch_size=16)
    assert main(["extract", "--model", str(tmp_path / "model"), "--tiles", str(tiles), "--out", str(tmp_path / "h5"),
                 "--format", "h5", "--batch-size", "16"]) == 0  # fmt: skip
    (slide_id, reference), = safetensors.items()
    features, coords, attributes = read_h5_features(tmp_path / "h5" / f"{slide_id}.h5")
    expected = load_file(str(reference))
    torch.testing.assert_close(features, expected["features"])
    assert torch.equal(coords, expected["coords"])
    manifest = pd.read_parquet(tiles / "manifest.parquet")
    np.testing.assert_array_equal(coords.numpy(), manifest[["x", "y"]].to_numpy())
    assert attributes["slide_id"] == slide_id


def test_h5_features_of_another_encoder_feed_the_survival_estimator(tmp_path):
    from histomim.survival import SurvivalEstimator
    from histomim.survival.study import breast_cancer_study

    X, y = breast_cancer_study()
    X, y = X.iloc[:30][["age", "size"]].copy(), y[:30]
    rng = np.random.default_rng(0)
    paths = []
    for i in range(len(X)):  # 1024-wide features, as a UNI/CONCH-sized encoder writes them with TRIDENT
        path = tmp_path / f"p{i}.h5"
        with h5py.File(path, "w") as file:
            file["features"] = rng.normal(size=(4 + i % 3, 1024)).astype(np.float32)
            file["coords"] = rng.integers(0, 5000, size=(4 + i % 3, 2))
        paths.append(str(path))
    X["slides"] = paths
    model = SurvivalEstimator(histology_col="slides", epochs=2, random_state=0, linear="none").fit(X, y)
    assert model.model_.config.histology_feature_dim == 1024
    assert np.isfinite(model.predict(X)).all()
