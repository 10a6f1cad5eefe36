"""Tissue detection and tiling on the real CMU-1 small-region SVS, plus bad slides."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from histomim.data.samples import sample_ihc_path, sample_slide_path
from histomim.data.slides import open_slide
from histomim.data.tiling import MANIFEST_COLUMNS, find_slides, tile_geometry, tile_manifest, tile_slides
from histomim.data.tissue import NoTissueError, detect_tissue, require_tissue, save_tissue_overlay

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "tile_slides.py"


@pytest.fixture(scope="module")
def slide():
    with open_slide(sample_slide_path()) as slide:
        yield slide


@pytest.fixture(scope="module")
def tissue(slide):
    return detect_tissue(slide)


@pytest.fixture(scope="module")
def bad_slides(tmp_path_factory) -> dict[str, Path]:
    """A corrupt file, an all-white TIFF with mpp, and an all-black PNG."""
    folder = tmp_path_factory.mktemp("bad")
    corrupt = folder / "corrupt.svs"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    white = folder / "white.tif"
    tifffile.imwrite(white, np.full((600, 800, 3), 255, np.uint8), photometric="rgb",
                     resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")  # fmt: skip
    black = folder / "black.png"
    Image.new("RGB", (300, 200), (0, 0, 0)).save(black)
    return {"corrupt": corrupt, "white": white, "black": black}


def green_pixels(png: Path) -> int:
    """Pixels of the lime tissue contour in an overlay PNG."""
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    return int(((rgb[..., 1] > 200) & (rgb[..., 0] < 120) & (rgb[..., 2] < 120)).sum())


# -- tissue ----------------------------------------------------------------------------------


def test_detects_tissue_on_sample_slide(slide, tissue):
    # The crop is a strip of skin over glass: by eye about a third of it is tissue.
    assert 0.25 < tissue.fraction < 0.5
    assert not tissue.is_empty
    assert tissue.downsample == pytest.approx(4.0 / 0.499, rel=0.01)  # 4 um/px mask
    width, height = slide.dimensions
    assert tissue.area_um2 == pytest.approx(tissue.fraction * width * height * 0.499**2, rel=0.01)
    # glass on the left, dermis at the bottom centre (level-0 boxes of 400 px)
    glass, dermis = tissue.region_fractions(np.array([300, 1160]), np.array([450, 2100]), 400)
    assert glass == 0 and dermis > 0.95
    assert require_tissue(slide, tissue) is tissue


def test_overlay_png_is_a_valid_image(slide, tissue, tmp_path):
    png = save_tissue_overlay(slide, tissue, tmp_path / "overlay.png")
    with Image.open(png) as image:
        image.verify()
    with Image.open(png) as image:
        assert image.format == "PNG" and min(image.size) > 200
    assert green_pixels(png) > 500  # the tissue outline is drawn
    assert not list(tmp_path.glob("*.partial*"))


@pytest.mark.parametrize("name, mpp", [("white", None), ("black", 0.5)])
def test_blank_slide_has_no_tissue(bad_slides, tmp_path, name, mpp):
    with open_slide(bad_slides[name], mpp_override=mpp) as blank:
        tissue = detect_tissue(blank)
        assert tissue.is_empty and tissue.fraction == 0 and tissue.area_um2 == 0
        png = save_tissue_overlay(blank, tissue, tmp_path / f"{name}.png")
        assert green_pixels(png) == 0
        with pytest.raises(NoTissueError, match=f"{name}.*no tissue detected"):
            require_tissue(blank, tissue)


# -- one slide -------------------------------------------------------------------------------


def test_geometry_picks_read_size_for_target_mpp(slide):
    at_half = tile_geometry(slide, mpp=0.5, tile_size=224)
    assert (at_half.level, at_half.read_size, at_half.size0, at_half.stride0) == (0, 224, 224, 224)
    assert at_half.mpp == pytest.approx(0.499)  # 224 * 1.002 rounds to 224 px: the scan's own mpp
    at_one = tile_geometry(slide, mpp=1.0, tile_size=224, overlap=32)
    assert (at_one.level, at_one.read_size) == (0, 449)
    assert at_one.mpp == pytest.approx(1.0, rel=1e-3)
    assert at_one.stride0 == pytest.approx(192 * 449 / 224)
    for bad in (dict(mpp=0), dict(tile_size=0), dict(overlap=224), dict(overlap=-1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            tile_geometry(slide, **{"mpp": 0.5, "tile_size": 224, **bad})


def test_tile_count_matches_tissue_area(slide, tissue):
    manifest = tile_manifest(slide, tissue, mpp=0.5, tile_size=224, min_tissue=0.5)
    assert list(manifest.columns) == list(MANIFEST_COLUMNS)
    assert (manifest.tissue_fraction >= 0.5).all() and (manifest.slide_id == "CMU-1-Small-Region").all()
    assert ((manifest.x + 224 <= 2220) & (manifest.y + 224 <= 2967)).all()  # whole tiles only
    tile_um2 = (224 * 0.499) ** 2
    # Tolerance 25%: a tile straddling the tissue edge counts as 0 or 1 instead of its fraction
    # (about +-0.5 tile each, of both signs, so a few tiles net of ~45), and the strips at the
    # right/bottom edges narrower than a tile (204 and 55 px here) are not tiled at all: ~5-10%.
    assert len(manifest) * tile_um2 == pytest.approx(tissue.area_um2, rel=0.25)

    # With every tile kept, summed tissue = tissue inside the tiled extent, exactly up to the
    # outward snapping of tile boxes to 8 px mask pixels.
    every_tile = tile_manifest(slide, tissue, mpp=0.5, tile_size=224, min_tissue=0.0)
    assert len(every_tile) == (2220 // 224) * (2967 // 224)
    rows, cols = round(13 * 224 / tissue.downsample), round(9 * 224 / tissue.downsample)
    tissue_in_extent = tissue.mask[:rows, :cols].sum() * (tissue.downsample * 0.499) ** 2
    assert (every_tile.tissue_fraction * tile_um2).sum() == pytest.approx(tissue_in_extent, rel=0.01)


def test_overlap_halves_the_stride(slide, tissue):
    manifest = tile_manifest(slide, tissue, mpp=0.5, tile_size=224, overlap=112, min_tissue=0.0)
    assert set(np.diff(np.unique(manifest.x))) == {112}
    assert len(manifest) == (1 + (2220 - 224) // 112) * (1 + (2967 - 224) // 112)


def test_pyramid_level_choice(slide, tmp_path):
    from test_slides import write_pyramid_tiff

    path = tmp_path / "pyramid.tif"
    write_pyramid_tiff(path, slide.read_region((600, 1400), 0, (1024, 768)), mpp=0.25)
    with open_slide(path) as pyramid:
        tissue = detect_tissue(pyramid)
        coarse = tile_manifest(pyramid, tissue, mpp=1.0, tile_size=64, min_tissue=0.0)
        assert set(coarse.level) == {2} and set(coarse.read_size) == {64} and len(coarse) == 4 * 3
        middle = tile_manifest(pyramid, tissue, mpp=0.75, tile_size=64, min_tissue=0.0)
        assert set(middle.level) == {1} and set(middle.read_size) == {96}
        assert middle.mpp.iloc[0] == pytest.approx(0.75)
        row = middle.iloc[5]
        assert pyramid.read_tile((row.x, row.y), row.level, row.read_size, row.tile_size).size == (64, 64)


# -- many slides -----------------------------------------------------------------------------


def test_tile_slides_reports_bad_slides_and_resumes(tmp_path, bad_slides, capsys):
    svs, ihc = sample_slide_path(), sample_ihc_path()
    paths = [svs, ihc, bad_slides["corrupt"], bad_slides["white"]]
    out = tmp_path / "out"
    report = tile_slides(paths, out, mpp=0.5, tile_size=224, min_tissue=0.5)
    printed = capsys.readouterr().err

    assert report.tiled == [str(svs)] and report.skipped == [] and not report.all_failed
    errors = {Path(e["path"]).name: e for e in report.errors}
    assert errors.keys() == {ihc.name, "corrupt.svs", "white.tif"}
    assert errors[ihc.name]["error"] == "MissingMPPError" and "--mpp-override" in errors[ihc.name]["message"]
    assert errors["corrupt.svs"]["error"] == "SlideError"
    assert errors["white.tif"]["error"] == "NoTissueError"
    for name, error in errors.items():
        assert name in error["message"]  # every message names its file
        assert f"failed: {error['error']}: {error['message']}" in printed
    assert json.loads((out / "errors.json").read_text()) == report.errors

    manifest = pd.read_parquet(out / "manifest.parquet")
    pd.testing.assert_frame_equal(manifest, report.manifest)
    assert set(manifest.slide_id) == {"CMU-1-Small-Region"} and len(manifest) > 30
    assert (out / "overlays" / "CMU-1-Small-Region.png").is_file()
    assert (out / "overlays" / "white.png").is_file()  # so a person can see why it failed
    assert sorted(p.name for p in (out / "manifests").iterdir()) == ["CMU-1-Small-Region.parquet"]

    # rerun: the finished slide is skipped (its manifest untouched), the PNG gets its mpp now
    done = out / "manifests" / "CMU-1-Small-Region.parquet"
    mtime = done.stat().st_mtime_ns
    again = tile_slides(paths, out, mpp=0.5, tile_size=224, min_tissue=0.5, mpp_override=0.5)
    assert again.skipped == [str(svs)] and again.tiled == [str(ihc)]
    assert done.stat().st_mtime_ns == mtime
    assert {Path(e["path"]).name for e in again.errors} == {"corrupt.svs", "white.tif"}
    assert set(again.manifest.slide_id) == {"CMU-1-Small-Region", ihc.stem}
    assert len(again.manifest) == len(manifest) + (again.manifest.slide_id == ihc.stem).sum()

    with pytest.raises(ValueError, match="tile_size: 224 -> 256.*tiling_config.json"):
        tile_slides(paths, out, mpp=0.5, tile_size=256)


def test_tile_slides_in_parallel_processes(tmp_path):
    svs, ihc = sample_slide_path(), sample_ihc_path()
    serial = tile_slides([svs, ihc], tmp_path / "serial", mpp_override=0.5, min_tissue=0.3)
    parallel = tile_slides([svs, ihc], tmp_path / "parallel", mpp_override=0.5, min_tissue=0.3, workers=2)
    assert sorted(parallel.tiled) == sorted(map(str, [svs, ihc])) and not parallel.errors
    pd.testing.assert_frame_equal(parallel.manifest, serial.manifest)


def test_duplicate_slide_ids_are_refused(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        shutil.copy(sample_ihc_path(), tmp_path / folder / "same.png")
    with pytest.raises(ValueError, match="same"):
        tile_slides([tmp_path / "a" / "same.png", tmp_path / "b" / "same.png"], tmp_path / "out")


def test_find_slides_expands_folders(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("a.png", "sub/c.svs", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    odd = tmp_path / "scan.weird"
    odd.write_bytes(b"x")
    assert find_slides([tmp_path]) == [tmp_path / "a.png", tmp_path / "sub" / "c.svs"]
    assert find_slides([odd, tmp_path / "a.png"]) == [odd, tmp_path / "a.png"]
    with pytest.raises(FileNotFoundError, match="missing.svs"):
        find_slides([tmp_path / "missing.svs"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no slides.*empty"):
        find_slides([tmp_path / "empty"])


def test_script_exit_code(tmp_path, bad_slides):
    spec = importlib.util.spec_from_file_location("tile_slides_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main([str(bad_slides["corrupt"]), "--out", str(tmp_path / "all_bad")]) == 1
    mixed = [str(sample_ihc_path()), str(bad_slides["corrupt"]), "--out", str(tmp_path / "mixed")]
    assert script.main([*mixed, "--mpp-override", "0.5", "--tile-size", "128", "--min-tissue", "0.3"]) == 0
    assert len(pd.read_parquet(tmp_path / "mixed" / "manifest.parquet")) > 0
