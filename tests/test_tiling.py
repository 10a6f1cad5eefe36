"""Tissue detection and tiling on the real CMU-1 small-region SVS, plus bad slides."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
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

    # rerun: the finished slide is skipped (its manifest untouched), the others fail again
    done = out / "manifests" / "CMU-1-Small-Region.parquet"
    mtime = done.stat().st_mtime_ns
    again = tile_slides(paths, out, mpp=0.5, tile_size=224, min_tissue=0.5)
    assert again.skipped == [str(svs)] and again.tiled == []
    assert done.stat().st_mtime_ns == mtime
    assert {Path(e["path"]).name for e in again.errors} == {ihc.name, "corrupt.svs", "white.tif"}
    # the PNG gets its mpp now (alone: --mpp-override would also change the SVS, which is refused)
    png = tile_slides([ihc], out, mpp=0.5, tile_size=224, min_tissue=0.5, mpp_override=0.5)
    assert png.tiled == [str(ihc)] and done.stat().st_mtime_ns == mtime
    assert set(png.manifest.slide_id) == {"CMU-1-Small-Region", ihc.stem}
    assert len(png.manifest) == len(manifest) + (png.manifest.slide_id == ihc.stem).sum()

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
    with pytest.raises(ValueError, match="same") as refused:
        tile_slides([tmp_path / "a" / "same.png", tmp_path / "b" / "same.png"], tmp_path / "out")
    assert str(tmp_path / "a" / "same.png") in str(refused.value) and str(tmp_path / "b" / "same.png") in str(refused.value)
    assert not (tmp_path / "out").exists()  # refused before anything is written


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


# -- reruns: identity of slides, settings, interrupted and crashed runs ------------------------

FAST = dict(mpp=2.0, tile_size=64, min_tissue=0.5)  # ~0.1 s of tiling per copy of the sample slide


def test_a_different_slide_under_a_finished_id_is_refused_not_skipped(tmp_path):
    """Run 1 tiles a/case1.svs (a symlink to CMU-1); run 2 gets b/case1.svs, another file (a copy): its tiles
    must not be taken for done, nor mixed with the first slide's."""
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    first, second = tmp_path / "a" / "case1.svs", tmp_path / "b" / "case1.svs"
    first.symlink_to(sample_slide_path())
    shutil.copy(sample_slide_path(), second)
    out = tmp_path / "out"
    report = tile_slides([first], out, **FAST)
    assert report.tiled == [str(first)]
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "case1.svs").symlink_to(first)  # the same file, reached by another path
    assert tile_slides([first, tmp_path / "c" / "case1.svs"], out, **FAST).skipped == [str(first)]

    with pytest.raises(ValueError, match="another file") as refused:
        tile_slides([second], out, **FAST)
    message = str(refused.value)
    assert str(sample_slide_path().resolve()) in message and str(second) in message and "--overwrite" in message
    assert set(pd.read_parquet(out / "manifest.parquet").path) == {str(sample_slide_path().resolve())}  # untouched

    replaced = tile_slides([second], out, **FAST, overwrite=True)
    assert replaced.tiled == [str(second)] and set(replaced.manifest.path) == {str(second)}
    assert tile_slides([second], out, **FAST).skipped == [str(second)]

    # the same file, modified since (a rescan written in place), is another slide too
    os.utime(second, ns=(0, second.stat().st_mtime_ns + 10**9))
    with pytest.raises(ValueError, match="mtime_ns"):
        tile_slides([second], out, **FAST)


@pytest.mark.parametrize("bad, flag", [
    (dict(tile_size=0), "--tile-size"), (dict(mpp=float("nan")), "--mpp"), (dict(overlap=-1), "--overlap"),
    (dict(min_tissue=1.5), "--min-tissue"), (dict(mpp_override=-0.5), "--mpp-override"), (dict(workers=0), "--workers"),
])  # fmt: skip
def test_invalid_settings_are_refused_before_tiling_config_is_written(tmp_path, bad, flag):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=flag):
        tile_slides([sample_slide_path()], out, **{**FAST, **bad})
    assert not out.exists()  # no tiling_config.json to block the corrected rerun
    assert tile_slides([sample_slide_path()], out, **FAST).tiled == [str(sample_slide_path())]


def test_changed_settings_are_detected_not_skipped(tmp_path):
    svs, ihc = sample_slide_path(), sample_ihc_path()
    out = tmp_path / "out"
    tile_slides([svs], out, **FAST)
    with pytest.raises(ValueError, match=r"tile_size: 64 -> 96.*--overwrite"):
        tile_slides([svs], out, **{**FAST, "tile_size": 96})
    retiled = tile_slides([svs], out, **{**FAST, "tile_size": 96}, overwrite=True)
    assert retiled.tiled == [str(svs)] and set(retiled.manifest.tile_size) == {96}
    assert json.loads((out / "tiling_config.json").read_text())["tile_size"] == 96

    # --mpp-override is the scan's resolution: a changed one changes every tile of the slide
    coarse = tile_slides([ihc], out, **{**FAST, "tile_size": 96}, mpp_override=1.0).manifest
    with pytest.raises(ValueError, match=r"skimage-immunohistochemistry.parquet: --mpp-override 1.0 -> 2.0"):
        tile_slides([ihc], out, **{**FAST, "tile_size": 96}, mpp_override=2.0)
    fine = tile_slides([ihc], out, **{**FAST, "tile_size": 96}, mpp_override=2.0, overwrite=True).manifest
    rows = lambda manifest: manifest[manifest.slide_id == ihc.stem]  # noqa: E731
    assert rows(coarse).read_size.iloc[0] == 2 * rows(fine).read_size.iloc[0] and len(rows(fine)) > len(rows(coarse))
    assert (fine.slide_id == svs.stem).sum() == (coarse.slide_id == svs.stem).sum()  # kept, untouched


def test_a_tile_folder_from_an_interrupted_run_says_so(tmp_path, monkeypatch):
    from conftest import tiny_config

    from histomim import HistoMIMModel
    from histomim.data import tiling
    from histomim.features import extract_features
    from histomim.data.tiles import load_tile_dataset

    second = tmp_path / "second.svs"
    shutil.copy(sample_slide_path(), second)
    out = tmp_path / "out"
    tile_slides([sample_slide_path()], out, **FAST)
    assert len(load_tile_dataset(out)) > 0 and json.loads((out / "complete.json").read_text())["tiles"] > 0

    real = tiling._tile_one_slide

    def killed_on_second(path, **job):
        if path == second:
            raise KeyboardInterrupt  # what Ctrl-C (or the end of a job's time) does mid-run
        return real(path, **job)

    monkeypatch.setattr(tiling, "_tile_one_slide", killed_on_second)
    with pytest.raises(KeyboardInterrupt):
        tile_slides([sample_slide_path(), second], out, **FAST)
    monkeypatch.undo()
    # the stale manifest.parquet of the first run lacks the second slide: no consumer may use it as complete
    for source in (out, out / "manifest.parquet", out / "manifests"):
        with pytest.raises(ValueError, match=f"{out} is an unfinished tile folder.*did not finish.*rerun") as refused:
            load_tile_dataset(source)
        assert type(refused.value).__name__ == "IncompleteTileFolderError"
    with pytest.raises(ValueError, match="unfinished tile folder"):
        extract_features(HistoMIMModel(tiny_config()), out, tmp_path / "features")
    rerun = tile_slides([sample_slide_path(), second], out, **FAST)
    assert rerun.skipped == [str(sample_slide_path())] and rerun.tiled == [str(second)]
    assert set(load_tile_dataset(out, keep_columns=["slide_id"]).rows["slide_id"]) == {"CMU-1-Small-Region", "second"}


def die_on_crash_slides(path, **job):
    """A tiling worker that dies like one killed by the out-of-memory killer, on slides named crash*."""
    from histomim.data import tiling

    if path.stem.startswith("crash"):
        os.kill(os.getpid(), signal.SIGKILL)
    return tiling._tile_one_slide(path, **job)


def test_a_crashed_tiling_worker_names_its_slide_and_the_others_finish(tmp_path, monkeypatch, capsys):
    from histomim.cli import tile as tile_cli
    from histomim.data import tiling

    slides = tmp_path / "slides"
    slides.mkdir()
    for name in ("crash.svs", "good1.svs", "good2.svs"):
        shutil.copy(sample_slide_path(), slides / name)
    out = tmp_path / "out"
    monkeypatch.setattr(tiling, "_tile_one_slide", die_on_crash_slides)  # handed to each worker process
    argv = [str(slides), "--out", str(out), "--mpp", "2", "--tile-size", "64", "--workers", "2"]
    assert tile_cli.main(argv) == 1  # not a success: a slide is missing for no fault of its own
    printed = capsys.readouterr()
    assert f"failed: {slides / 'crash.svs'}: the worker process tiling this slide died (killed by SIGKILL" in printed.err
    assert "2 slides tiled, 0 already done, 1 failed" in printed.out
    errors = json.loads((out / "errors.json").read_text())
    assert [(e["slide_id"], e["error"]) for e in errors] == [("crash", "WorkerCrashedError")]
    assert set(pd.read_parquet(out / "manifest.parquet").slide_id) == {"good1", "good2"}
