"""Per-tile scores on the real CMU-1 slide: heat-map PNG over the thumbnail, QuPath GeoJSON that parses back
to the same tiles and scores, and the per-tile attention of SurvivalEstimator."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from histomim.data.slides import open_slide
from histomim.data.tiling import tile_manifest
from histomim.data.tissue import detect_tissue
from histomim.slide_maps import (
    qupath_feature_collection, read_qupath_tiles, save_tile_heatmap, score_image, tile_table, write_qupath_geojson,
)  # fmt: skip


@pytest.fixture(scope="module")
def tiled(sample_slide_path):
    slide = open_slide(sample_slide_path)
    tissue = detect_tissue(slide)
    manifest = tile_manifest(slide, tissue, mpp=2.0, tile_size=64, min_tissue=0.5)
    return slide, tissue, manifest


def test_tile_table_and_score_image_place_each_tile(tiled):
    slide, _, manifest = tiled
    scores = np.linspace(0, 1, len(manifest))
    tiles = tile_table(slide, manifest, {"score": scores})
    assert len(tiles) == len(manifest) > 20
    np.testing.assert_allclose(tiles["size"], round(64 * 2.0 / slide.mpp))  # 64 px at 2 um/px, in level-0 px
    image = score_image(tiles, "score", (100, 100), downsample=30.0)
    first = tiles.iloc[0]
    assert image[int(first.y // 30) + 1, int(first.x // 30) + 1] == pytest.approx(scores[0])
    assert np.isnan(image).any() and np.isfinite(image).any()
    with pytest.raises(ValueError, match=r"score 'bad' has 3 values for \d+ tiles of CMU-1-Small-Region"):
        tile_table(slide, manifest, {"bad": [1, 2, 3]})


def test_heatmap_png_over_the_thumbnail(tiled, tmp_path):
    slide, _, manifest = tiled
    tiles = tile_table(slide, manifest, {"attention": manifest["tissue_fraction"].to_numpy()})
    path = save_tile_heatmap(slide, tiles, "attention", tmp_path / "heatmap.png", max_size=512)
    with Image.open(path) as png:
        assert png.format == "PNG"
        pixels = np.asarray(png.convert("RGB")).astype(int)
    assert pixels.std() > 10  # a drawn slide, not a blank canvas


def test_geojson_round_trip_gives_the_same_tiles_and_scores(tiled, tmp_path):
    slide, tissue, manifest = tiled
    rng = np.random.default_rng(0)
    tiles = tile_table(slide, manifest, {"attention": rng.dirichlet(np.ones(len(manifest))), "risk": rng.normal(size=len(manifest))})
    path = write_qupath_geojson(tmp_path / "slide.geojson", tiles, tissue=tissue)
    collection = json.loads(path.read_text())
    assert collection["type"] == "FeatureCollection"
    kinds = [f["properties"]["objectType"] for f in collection["features"]]
    assert kinds.count("tile") == len(tiles) and kinds.count("annotation") >= 1
    # tissue contours: closed rings in level-0 px inside the slide, enclosing most of the tissue's tiles
    width, height = slide.dimensions
    from matplotlib.path import Path as MplPath

    annotations = [f for f in collection["features"] if f["properties"]["objectType"] == "annotation"]
    outers = [np.asarray(f["geometry"]["coordinates"][0]) for f in annotations]
    for ring in outers:
        assert np.allclose(ring[0], ring[-1]) and len(ring) >= 4
        assert ring.min() >= 0 and ring[:, 0].max() <= width and ring[:, 1].max() <= height
    centres = tiles[["x", "y"]].to_numpy() + tiles[["size"]].to_numpy() / 2
    inside = np.zeros(len(centres), bool)
    for ring in outers:
        inside |= MplPath(ring).contains_points(centres)
    assert inside.mean() > 0.9
    # the reader gives back the very tiles and scores
    back = read_qupath_tiles(path)
    np.testing.assert_allclose(back[["x", "y", "size"]].to_numpy(), tiles[["x", "y", "size"]].to_numpy())
    np.testing.assert_allclose(back["attention"], tiles["attention"])
    np.testing.assert_allclose(back["risk"], tiles["risk"])
    # detections instead of tiles read back the same way
    detections = qupath_feature_collection(tiles.iloc[:3], tile_object_type="detection")
    (tmp_path / "det.geojson").write_text(json.dumps(detections))
    assert len(read_qupath_tiles(tmp_path / "det.geojson")) == 3
    with pytest.raises(ValueError, match="tile_object_type must be one of"):
        qupath_feature_collection(tiles, tile_object_type="cell")


def test_tissue_holes_become_polygon_holes():
    from histomim.data.tissue import TissueMask
    from histomim.slide_maps import tissue_polygons

    mask = np.zeros((20, 20), bool)
    mask[2:18, 2:18] = True
    mask[8:12, 8:12] = False
    mask[0:2, 0:2] = True  # a second piece touching the border
    polygons = tissue_polygons(TissueMask(mask=mask, downsample=10.0, mpp=0.5, threshold=0.1))
    assert sorted(len(p) for p in polygons) == [1, 2]  # the square carries its hole, the corner piece none
    square = next(p for p in polygons if len(p) == 2)
    assert square[0][:, 0].min() == pytest.approx(20.0, abs=5) and square[0][:, 0].max() == pytest.approx(180.0, abs=5)
    assert square[1][:, 0].min() == pytest.approx(80.0, abs=5) and square[1][:, 0].max() == pytest.approx(120.0, abs=5)


def test_read_names_the_file_of_a_non_tile_geometry(tmp_path):
    bad = {"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]},
                                                       "properties": {"objectType": "detection"}}]}  # fmt: skip
    (tmp_path / "bad.geojson").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="bad.geojson: feature 0 is a Point"):
        read_qupath_tiles(tmp_path / "bad.geojson")


def test_survival_estimator_returns_per_tile_attention(tmp_path):
    from safetensors.torch import save_file
    import torch

    from histomim.survival import SurvivalEstimator
    from histomim.survival.study import breast_cancer_study

    X, y = breast_cancer_study()
    X, y = X.iloc[:30][["age", "size"]].copy(), y[:30]
    rng = np.random.default_rng(0)
    paths = []
    for i in range(len(X)):
        path = tmp_path / f"p{i}.safetensors"
        save_file({"features": torch.from_numpy(rng.normal(size=(3 + i % 4, 8)).astype(np.float32))}, str(path))
        paths.append(str(path))
    X["slides"] = paths
    model = SurvivalEstimator(histology_col="slides", epochs=3, random_state=0, linear="none").fit(X, y)
    attention = model.predict_attention(X.iloc[:5])
    assert [len(a) for a in attention] == [3, 4, 5, 6, 3]
    for weights in attention:
        assert weights.sum() == pytest.approx(1.0, abs=1e-5) and (weights > 0).all()
    assert not np.allclose(attention[1], 0.25)  # learned, not uniform
    with pytest.raises(ValueError, match="without histology_col"):
        SurvivalEstimator(epochs=1, random_state=0, linear="none").fit(X[["age", "size"]], y).predict_attention(X)
