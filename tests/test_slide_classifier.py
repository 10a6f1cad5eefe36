"""SlideClassifier (ABMIL) on features of real tiles: bags of CMU-1 H&E tiles against bags of the scikit-image IHC
image's tiles, held-out bags classified, attention per tile drawn over the CMU-1 slide and exported to GeoJSON."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image

from histomim import HistoMIMModel, image_processor_for
from histomim.data.slides import open_slide
from histomim.data.tiling import tile_manifest
from histomim.data.tissue import detect_tissue
from histomim.multimodal.slide_classifier import SlideClassifier


@pytest.fixture(scope="module")
def real_tile_features(sample_slide_path):
    """Features (tiny random-init encoder) of the CMU-1 tissue tiles (with their manifest) and of the IHC image's tiles."""
    from histomim.data.samples import sample_ihc_path

    slide = open_slide(sample_slide_path)
    manifest = tile_manifest(slide, detect_tissue(slide), mpp=2.0, tile_size=64, min_tissue=0.5)
    he_tiles = [slide.read_tile((int(r.x), int(r.y)), int(r.level), int(r.read_size), 64) for r in manifest.itertuples()]
    ihc = np.asarray(Image.open(sample_ihc_path()).convert("RGB"))
    ihc_tiles = [Image.fromarray(ihc[y : y + 64, x : x + 64]) for y in range(0, 512, 64) for x in range(0, 512, 64)]
    torch.manual_seed(0)
    encoder = HistoMIMModel(tiny_config()).eval()
    processor = image_processor_for(encoder.config)

    def embed(tiles):
        with torch.no_grad():
            return encoder(**processor(images=tiles, return_tensors="pt")).pooler_output.numpy()  # (N, 64)

    return slide, manifest, embed(he_tiles), embed(ihc_tiles)


def bags_of(features: np.ndarray, count: int, size: int, rng) -> list[np.ndarray]:
    return [features[rng.choice(len(features), size=size, replace=False)] for _ in range(count)]


def test_classifies_held_out_bags_of_real_tiles(real_tile_features, tmp_path):
    from safetensors.torch import save_file
    from sklearn.base import clone

    _, _, he, ihc = real_tile_features
    rng = np.random.default_rng(0)
    # disjoint tiles for training and test bags
    train = bags_of(he[:24], 6, 6, rng) + bags_of(ihc[:48], 6, 6, rng)
    test = bags_of(he[24:], 3, 5, rng) + bags_of(ihc[48:], 3, 5, rng)
    labels_train, labels_test = ["H&E"] * 6 + ["IHC"] * 6, ["H&E"] * 3 + ["IHC"] * 3
    # bags as feature files, the way `histomim extract` writes them
    files = []
    for i, bag in enumerate(train):
        save_file({"features": torch.from_numpy(bag), "coords": torch.zeros(len(bag), 2, dtype=torch.int64)},
                  str(tmp_path / f"slide{i}.safetensors"))  # fmt: skip
        files.append(tmp_path / f"slide{i}.safetensors")
    model = SlideClassifier(epochs=60, random_state=0).fit(files, labels_train)
    assert model.loss_history_[-1] < 0.5 * model.loss_history_[0]
    assert list(model.classes_) == ["H&E", "IHC"]
    probabilities = model.predict_proba(test)
    assert probabilities.shape == (6, 2) and np.allclose(probabilities.sum(1), 1)
    assert model.score(test, labels_test) == 1.0
    # scikit-learn compatible and seeded: a clone refits to the same probabilities
    again = clone(model).fit(files, labels_train)
    np.testing.assert_allclose(again.predict_proba(test), probabilities, rtol=1e-5)
    with pytest.raises(FileNotFoundError, match="slide 1: .*missing.safetensors"):
        model.predict([files[0], tmp_path / "missing.safetensors"])
    with pytest.raises(ValueError, match="widths \\[3\\]; the classifier was fitted on 64"):
        model.predict([np.zeros((4, 3))])


def test_attention_over_the_slide_feeds_the_heatmap_and_geojson(real_tile_features, tmp_path):
    from histomim.slide_maps import read_qupath_tiles, save_tile_heatmap, tile_table, write_qupath_geojson

    slide, manifest, he, ihc = real_tile_features
    rng = np.random.default_rng(1)
    model = SlideClassifier(epochs=40, random_state=0).fit(
        bags_of(he, 5, 8, rng) + bags_of(ihc, 5, 8, rng), ["H&E"] * 5 + ["IHC"] * 5
    )
    attention = model.predict_attention([he, ihc[:7]])
    assert [len(a) for a in attention] == [len(he), 7]
    assert all(a.sum() == pytest.approx(1.0, abs=1e-5) for a in attention)
    tiles = tile_table(slide, manifest, {"attention": attention[0]})
    png = save_tile_heatmap(slide, tiles, "attention", tmp_path / "attention.png", max_size=512)
    assert Image.open(png).format == "PNG"
    back = read_qupath_tiles(write_qupath_geojson(tmp_path / "attention.geojson", tiles))
    np.testing.assert_allclose(back["attention"], attention[0])


def test_classify_command_scores_held_out_slides_and_maps_the_tiled_one(real_tile_features, tmp_path, capsys):
    import json

    import pandas as pd
    from safetensors.torch import save_file

    from histomim.cli import main
    from histomim.slide_maps import read_qupath_tiles

    slide, manifest, he, ihc = real_tile_features
    rng = np.random.default_rng(2)
    bags = [he] + bags_of(he, 5, 6, rng) + bags_of(ihc, 6, 6, rng)
    rows = []
    for i, bag in enumerate(bags):
        save_file({"features": torch.from_numpy(np.ascontiguousarray(bag))}, str(tmp_path / f"bag{i}.safetensors"))
        rows.append({"features": f"bag{i}.safetensors", "label": "H&E" if i < 6 else "IHC",
                     "slide_id": slide.slide_id if i == 0 else f"bag{i}"})  # fmt: skip
    pd.DataFrame(rows).to_csv(tmp_path / "slides.csv", index=False)
    manifest.to_parquet(tmp_path / "manifest.parquet")
    out = tmp_path / "cls"
    assert main(["classify", "--table", str(tmp_path / "slides.csv"), "--slide-column", "slide_id", "--tiles",
                 str(tmp_path / "manifest.parquet"), "--output-dir", str(out), "--epochs", "40"]) == 0  # fmt: skip
    assert "held-out slides" in capsys.readouterr().out
    summary = json.loads((out / "classify_summary.json").read_text())
    assert summary["split"]["num_test"] == 4 and summary["test"]["balanced_accuracy"] == 1.0
    predictions = pd.read_csv(out / "predictions.csv")
    assert (predictions["split"] == "test").sum() == 4 and set(predictions["predicted"]) == {"H&E", "IHC"}
    assert (out / f"{slide.slide_id}_attention.png").is_file()
    tiles = read_qupath_tiles(out / f"{slide.slide_id}.geojson")
    assert len(tiles) == len(manifest) and tiles["attention"].sum() == pytest.approx(1.0, abs=1e-4)
