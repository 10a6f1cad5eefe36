"""Per-tile scores on a slide: a heat-map PNG over the thumbnail, and QuPath-readable GeoJSON.

    tiles = tile_table(slide, manifest, {"attention": attention})   # x, y, size (level-0 px) + scores
    save_tile_heatmap(slide, tiles, "attention", "heatmap.png")
    write_qupath_geojson("slide.geojson", tiles, tissue=tissue)     # tissue contours + tile squares
    read_qupath_tiles("slide.geojson")                               # back to the same table

Scores are any per-tile values: ABMIL attention (`SlideClassifier.predict_attention`,
`SurvivalEstimator.predict_attention`), a classifier's probability, a feature. Everything is in
level-0 pixel coordinates, which is what QuPath expects of an imported GeoJSON: a FeatureCollection
of Polygon features whose ``properties.objectType`` is ``annotation`` (tissue contours, with their
holes), ``tile`` or ``detection`` (tiles, so QuPath can colour them by measurement), with the scores
as ``properties.measurements`` ({name: value}, QuPath 0.4+).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .atomic import atomic_path

TILE_OBJECT_TYPES = ("tile", "detection")


def tile_table(slide, manifest, scores: Mapping[str, np.ndarray]):
    """A DataFrame of the manifest's tiles of one slide: ``x``, ``y`` (level-0 top-left), ``size`` (level-0
    side, from the manifest's level and read size) and one column per score (each (N,), in manifest order)."""
    import pandas as pd

    downsamples = np.asarray(slide.level_downsamples)[manifest["level"].to_numpy()]
    table = pd.DataFrame({"x": manifest["x"].to_numpy(), "y": manifest["y"].to_numpy(),
                          "size": manifest["read_size"].to_numpy() * downsamples})  # fmt: skip
    for name, values in scores.items():
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        if len(values) != len(table):
            raise ValueError(f"score {name!r} has {len(values)} values for {len(table)} tiles of {slide.slide_id}")
        table[name] = values
    return table


def score_image(tiles, column: str, shape: tuple[int, int], downsample: float) -> np.ndarray:
    """(h, w) float image on a grid ``downsample`` times coarser than level 0: each tile's score over its
    square, NaN where there is no tile (overlapping tiles: the later one wins)."""
    image = np.full(shape, np.nan)
    for x, y, size, value in tiles[["x", "y", "size", column]].itertuples(index=False):
        left, top = int(np.floor(x / downsample)), int(np.floor(y / downsample))
        right, bottom = int(np.ceil((x + size) / downsample)), int(np.ceil((y + size) / downsample))
        image[max(top, 0) : bottom, max(left, 0) : right] = value
    return image


def save_tile_heatmap(slide, tiles, column: str, path: str | Path, max_size: int = 1024, alpha: float = 0.5,
                      cmap: str = "inferno", title: str | None = None) -> Path:  # fmt: skip
    """A PNG of the slide thumbnail (at most ``max_size`` px) with the tiles coloured by ``column``, and a
    colour bar; tiles without a score (NaN) stay clear."""
    from .plotting import new_figure, save_png

    thumbnail = slide.thumbnail(max_size)  # (h, w, 3)
    width, _ = slide.dimensions
    heat = score_image(tiles, column, thumbnail.shape[:2], width / thumbnail.shape[1])
    figure = new_figure(figsize=(8, 8 * thumbnail.shape[0] / thumbnail.shape[1] + 0.8), layout="constrained")
    axes = figure.add_subplot()
    axes.imshow(thumbnail)
    shown = axes.imshow(np.ma.masked_invalid(heat), cmap=cmap, alpha=alpha, interpolation="nearest")
    figure.colorbar(shown, ax=axes, shrink=0.8, label=column)
    axes.set_title(title or f"{slide.slide_id}: {column} of {len(tiles)} tiles", fontsize=10)
    axes.set_axis_off()
    return save_png(figure, path)


def tissue_polygons(tissue) -> list[list[np.ndarray]]:
    """The tissue mask's outlines as polygons in level-0 px: per piece of tissue, its outer ring then its
    holes, each a closed (K, 2) array of (x, y)."""
    from matplotlib.path import Path as MplPath
    from skimage.measure import find_contours

    padded = np.pad(tissue.mask.astype(np.float64), 1)  # closes the contours that touch the border
    outers, holes = [], []
    for contour in find_contours(padded, 0.5):
        ring = (contour[:, ::-1] - 1 + 0.5) * tissue.downsample  # (row, col) in padded px -> level-0 (x, y)
        x, y = ring[:, 0], ring[:, 1]
        signed_area = 0.5 * np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y)
        # find_contours runs around tissue one way and around holes the other
        (outers if signed_area > 0 else holes).append(ring)
    polygons = [[outer] for outer in outers]
    for hole in holes:
        for polygon in polygons:
            if MplPath(polygon[0]).contains_point(hole[0]):
                polygon.append(hole)
                break
    return polygons


def _square(x: float, y: float, size: float) -> list[list[float]]:
    return [[x, y], [x + size, y], [x + size, y + size], [x, y + size], [x, y]]


def qupath_feature_collection(tiles=None, tissue=None, tile_object_type: str = "tile", tile_class: str = "Tile",
                              tissue_class: str = "Tissue") -> dict:  # fmt: skip
    """A GeoJSON FeatureCollection QuPath imports: tissue contours as annotations, tiles as ``tile_object_type``
    squares whose measurements are every score column of ``tiles``."""
    if tile_object_type not in TILE_OBJECT_TYPES:
        raise ValueError(f"tile_object_type must be one of {TILE_OBJECT_TYPES}, got {tile_object_type!r}")
    features = []
    if tissue is not None:
        for polygon in tissue_polygons(tissue):
            features.append({
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring.round(2).tolist() for ring in polygon]},
                "properties": {"objectType": "annotation", "classification": {"name": tissue_class},
                               "isLocked": False},
            })  # fmt: skip
    if tiles is not None:
        score_columns = [c for c in tiles.columns if c not in ("x", "y", "size")]
        for row in tiles.itertuples(index=False):
            row = row._asdict()
            features.append({
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [_square(float(row["x"]), float(row["y"]), float(row["size"]))]},
                "properties": {"objectType": tile_object_type, "classification": {"name": tile_class},
                               "measurements": {name: float(row[name]) for name in score_columns}},
            })  # fmt: skip
    return {"type": "FeatureCollection", "features": features}


def write_qupath_geojson(path: str | Path, tiles=None, tissue=None, tile_object_type: str = "tile") -> Path:
    """Write `qupath_feature_collection` to ``path`` (atomically); open it in QuPath with File > Import objects."""
    path = Path(path)
    collection = qupath_feature_collection(tiles, tissue, tile_object_type)
    with atomic_path(path) as partial:
        partial.write_text(json.dumps(collection))
    return path


def read_qupath_tiles(path: str | Path):
    """The tiles of a GeoJSON written by `write_qupath_geojson` (or QuPath's export of tiles/detections) as a
    DataFrame: ``x``, ``y``, ``size`` (level-0, from each square's bounds) and one column per measurement."""
    import pandas as pd

    path = Path(path)
    collection = json.loads(path.read_text())
    if collection.get("type") != "FeatureCollection":
        raise ValueError(f"{path}: not a GeoJSON FeatureCollection (type {collection.get('type')!r})")
    rows = []
    for index, feature in enumerate(collection["features"]):
        properties = feature.get("properties") or {}
        if properties.get("objectType") not in TILE_OBJECT_TYPES:
            continue
        if feature["geometry"]["type"] != "Polygon":
            raise ValueError(f"{path}: feature {index} is a {feature['geometry']['type']}, not a tile's Polygon")
        ring = np.asarray(feature["geometry"]["coordinates"][0], dtype=np.float64)  # (5, 2)
        (left, top), (right, bottom) = ring.min(axis=0), ring.max(axis=0)
        if not np.isclose(right - left, bottom - top):
            raise ValueError(f"{path}: feature {index} is {right - left}x{bottom - top}, not a square tile")
        measurements = properties.get("measurements") or {}
        if isinstance(measurements, list):  # QuPath before 0.4: [{"name": ..., "value": ...}]
            measurements = {item["name"]: item["value"] for item in measurements}
        rows.append({"x": left, "y": top, "size": right - left, **measurements})
    return pd.DataFrame(rows)


__all__ = ["tile_table", "score_image", "save_tile_heatmap", "tissue_polygons", "qupath_feature_collection",
           "write_qupath_geojson", "read_qupath_tiles", "TILE_OBJECT_TYPES"]  # fmt: skip
