"""Pen ink, blur and brightness on the real CMU-1 slide, copied with marker strokes drawn on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image, ImageDraw, ImageFilter

from histomim.cli.tile import main as tile_main
from histomim.data.quality import pen_mask_from_rgb, tile_quality
from histomim.data.samples import sample_nuclei_pairs, sample_slide_path
from histomim.data.slides import open_slide
from histomim.data.tiling import TileFolder, tile_manifest
from histomim.data.tissue import detect_tissue

# (colour, width px, level-0 polyline): blue over the glass left of the skin, green and black across it.
# 200 px is 0.1 mm: a fine marker (a broad one draws 1 mm lines).
STROKES = {
    "blue": ((20, 70, 180), 200, [(250, 1300), (250, 2900)]),
    "green": ((30, 150, 80), 200, [(800, 1700), (1250, 2100)]),
    "black": ((25, 25, 30), 200, [(700, 2650), (1350, 2650)]),
}
BLURRED_BOX = (890, 1110, 1350, 1350)  # level-0 (left, top, right, bottom) of out-of-focus tissue
INK_OPACITY = 0.85  # marker ink lets a little of the stain through


@pytest.fixture(scope="module")
def inked(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A TIFF copy of CMU-1 with the `STROKES` drawn and `BLURRED_BOX` blurred; and the (H, W) bool stroke mask."""
    with open_slide(sample_slide_path()) as slide:
        rgb = slide.read_region((0, 0), 0, slide.dimensions)  # (2967, 2220, 3)
        mpp = slide.mpp
    image = Image.fromarray(rgb)
    image.paste(image.crop(BLURRED_BOX).filter(ImageFilter.GaussianBlur(4)), BLURRED_BOX[:2])
    pixels = np.asarray(image).astype(np.float64)
    strokes = np.zeros(rgb.shape[:2], bool)
    for colour, width, line in STROKES.values():
        canvas = Image.new("L", image.size)
        ImageDraw.Draw(canvas).line(line, fill=255, width=width)
        stroke = np.asarray(canvas) > 0
        pixels[stroke] = INK_OPACITY * np.array(colour) + (1 - INK_OPACITY) * pixels[stroke]
        strokes |= stroke
    path = tmp_path_factory.mktemp("inked") / "CMU-1-inked.tif"
    tifffile.imwrite(path, pixels.round().astype(np.uint8), photometric="rgb", tile=(256, 256),
                     resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")  # fmt: skip
    return path, strokes


def box_fraction(mask: np.ndarray, x: int, y: int, size: int) -> float:
    return float(mask[y : y + size, x : x + size].mean())


def test_ink_over_glass_is_not_tissue(inked):
    path, strokes = inked
    with open_slide(path) as slide:
        assert slide.mpp == pytest.approx(0.499, rel=1e-3)
        tissue = detect_tissue(slide)
    # the blue stroke lies over glass: 5 boxes along it, each mostly ink, hold no tissue
    ys = np.arange(1400, 2800, 300)
    xs = np.full_like(ys, 230)
    assert all(box_fraction(strokes, x, y, 40) > 0.9 for x, y in zip(xs, ys))
    np.testing.assert_array_equal(tissue.region_fractions(xs, ys, 40), 0)


def test_tile_drops_stroked_and_blurred_tiles_and_keeps_clean_tissue(inked, tmp_path):
    path, strokes = inked
    out = tmp_path / "tiles"
    assert tile_main([str(path), "--out", str(out), "--max-pen-fraction", "0.1", "--min-focus", "200"]) == 0
    manifest = pd.read_parquet(TileFolder(out).manifest_path)
    assert {"pen_fraction", "focus", "brightness"} <= set(manifest.columns)
    with open_slide(sample_slide_path()) as clean_slide:
        clean = tile_manifest(clean_slide, detect_tissue(clean_slide))  # the same slide without ink or blur
    with open_slide(path) as slide:
        unfiltered = tile_manifest(slide, detect_tissue(slide), max_pen_fraction=1.0)  # ink and blur kept

    blur = np.zeros_like(strokes)
    blur[BLURRED_BOX[1] : BLURRED_BOX[3], BLURRED_BOX[0] : BLURRED_BOX[2]] = True

    def stroked(frame: pd.DataFrame) -> pd.Series:  # share of each tile under a stroke
        return frame.apply(lambda row: box_fraction(strokes, row.x, row.y, row.read_size), axis=1)

    def blurred(frame: pd.DataFrame) -> pd.Series:  # share of each tile in the blurred box
        return frame.apply(lambda row: box_fraction(blur, row.x, row.y, row.read_size), axis=1)

    # 1. stroked tiles are gone: every kept tile has less than a tenth of ink over it
    assert (stroked(manifest) < 0.1).all() and (manifest.pen_fraction <= 0.1).all()
    inked_tissue = unfiltered[stroked(unfiltered) > 0.15]
    assert len(inked_tissue) >= 5  # there were tiles to drop
    # the score measures the ink: within a few percent (stain taken for ink) of the drawn share
    np.testing.assert_allclose(unfiltered.pen_fraction, stroked(unfiltered), atol=0.05)
    # 2. blurred tiles are gone, though they were tissue tiles with a far lower focus score
    out_of_focus = unfiltered[blurred(unfiltered) == 1]
    assert len(out_of_focus) == 2 and (out_of_focus.focus < 10).all() and not (blurred(manifest) == 1).any()
    assert (clean[blurred(clean) == 1].focus > 1000).all()
    # 3. every clean tissue tile away from the ink and the blur is kept, with the same scores
    untouched = clean[(stroked(clean) == 0) & (blurred(clean) == 0)]
    assert len(untouched) >= 20  # half of the clean tissue tiles
    kept = untouched.merge(manifest, on=["x", "y"], suffixes=("", "_inked"))
    assert len(kept) == len(untouched)
    np.testing.assert_allclose(kept.focus_inked, kept.focus, rtol=1e-6)
    np.testing.assert_allclose(kept.pen_fraction_inked, kept.pen_fraction)


def test_stain_is_not_ink():
    """Real H&E: haematoxylin is blue-purple and dense nuclei are near-black, yet neither counts as ink."""
    for png, _ in sample_nuclei_pairs():
        rgb = np.asarray(Image.open(png).convert("RGB"))
        assert pen_mask_from_rgb(rgb).mean() < 0.01, png.name
    with open_slide(sample_slide_path()) as slide:
        tiles = tile_manifest(slide, detect_tissue(slide), max_pen_fraction=1.0)
    assert tiles.pen_fraction.max() < 0.1
    # and a field of each ink colour is all ink
    for colour, _, _ in STROKES.values():
        assert pen_mask_from_rgb(np.full((8, 8, 3), colour, np.uint8)).all()


def test_brightness_bound_drops_glass_and_scores_are_what_they_say():
    with open_slide(sample_slide_path()) as slide:
        tissue = detect_tissue(slide)
        not_glass = tile_manifest(slide, tissue, min_tissue=0.0, max_brightness=0.85)
        tile = np.asarray(slide.read_tile((not_glass.x[0], not_glass.y[0]), 0, 224, 224))
    # the whole grid of 224 px tiles, and which of them lie on bare glass
    ys, xs = (g.ravel() for g in np.meshgrid(np.arange(13) * 224, np.arange(9) * 224, indexing="ij"))
    fractions = tissue.region_fractions(xs, ys, 224)
    kept = set(zip(not_glass.x, not_glass.y))
    assert (not_glass.brightness <= 0.85).all()
    assert not kept & set(zip(xs[fractions == 0], ys[fractions == 0]))  # no glass tile passes
    assert set(zip(xs[fractions >= 0.5], ys[fractions >= 0.5])) <= kept  # every tissue tile does
    quality = tile_quality(tile)
    assert (not_glass.brightness[0], not_glass.focus[0]) == pytest.approx((quality.brightness, quality.focus))
    flat = tile_quality(np.full((32, 32, 3), 200, np.uint8))
    assert flat.focus == 0 and flat.brightness == pytest.approx(200 / 255) and flat.pen_fraction == 0


@pytest.mark.parametrize(
    "flag, value, message",
    [("--max-pen-fraction", "1.5", "max_pen_fraction"), ("--min-focus", "-1", "min_focus"),
     ("--max-brightness", "2", "max_brightness")],
)  # fmt: skip
def test_bad_quality_bounds_are_refused_before_anything_is_written(flag, value, message, tmp_path):
    out = tmp_path / "tiles"
    with pytest.raises(ValueError, match=rf"{message} \({flag}\)"):
        tile_main([str(sample_slide_path()), "--out", str(out), flag, value])
    assert not TileFolder(out).config_path.exists()
