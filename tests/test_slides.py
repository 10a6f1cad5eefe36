"""Slide opening and reading on the real CMU-1 small-region SVS, plus synthetic edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from histomim.data.samples import sample_ihc_path, sample_slide_path
from histomim.data.slides import MissingMPPError, SlideError, open_slide, to_rgb_array


@pytest.fixture(scope="module")
def svs_path():
    return sample_slide_path()


@pytest.fixture(scope="module")
def slide(svs_path):
    with open_slide(svs_path) as slide:
        yield slide


def write_pyramid_tiff(path, level0: np.ndarray, mpp: float | None, levels: int = 3) -> None:
    """A tiled pyramidal TIFF (levels as SubIFDs, 2x steps) that tiffslide reads as a slide."""
    options = dict(tile=(128, 128), photometric="rgb", compression="zlib")
    resolution = dict(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER") if mpp else {}
    with tifffile.TiffWriter(path) as tif:
        tif.write(level0, subifds=levels - 1, **resolution, **options)
        for level in range(1, levels):
            factor = 2**level
            height, width = level0.shape[0] // factor, level0.shape[1] // factor
            smaller = np.asarray(Image.fromarray(level0).resize((width, height), Image.Resampling.BOX))
            tif.write(smaller, subfiletype=1, **options)


def test_sample_svs_metadata(slide, svs_path):
    assert slide.backend == "tiffslide"
    assert slide.path == svs_path
    assert slide.slide_id == "CMU-1-Small-Region"
    assert slide.dimensions == (2220, 2967)
    assert slide.level_count == 1
    assert slide.level_dimensions == ((2220, 2967),)
    assert slide.level_downsamples == (1.0,)
    assert slide.mpp == pytest.approx(0.499)
    assert slide.objective_power == 20
    assert slide.require_mpp() == pytest.approx(0.499)


@pytest.mark.parametrize(
    "location, size",
    [((0, 0), (300, 200)), ((1000, 1500), (224, 224)), ((2100, 2900), (224, 224)), ((-40, -30), (100, 80))],
)
def test_tiffslide_and_openslide_read_identical_pixels(svs_path, location, size):
    pytest.importorskip("openslide")
    with open_slide(svs_path, backend="tiffslide") as tiff, open_slide(svs_path, backend="openslide") as native:
        assert native.backend == "openslide"
        assert native.dimensions == tiff.dimensions and native.mpp == pytest.approx(tiff.mpp)
        a, b = tiff.read_region(location, 0, size), native.read_region(location, 0, size)
    assert a.shape == b.shape == (size[1], size[0], 3) and a.dtype == np.uint8
    # both decode the same JPEG tiles with libjpeg(-turbo); allow 1 grey level for IDCT rounding
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_read_region_pads_outside_with_white(slide):
    region = slide.read_region((-50, -20), 0, (150, 120))  # (120, 150, 3)
    assert region.shape == (120, 150, 3)
    assert (region[:20] == 255).all() and (region[:, :50] == 255).all()
    np.testing.assert_array_equal(region[20:, 50:], slide.read_region((0, 0), 0, (100, 100)))
    beyond = slide.read_region((5000, 5000), 0, (10, 10))
    assert (beyond == 255).all()


def test_read_region_rejects_bad_level_and_size(slide):
    with pytest.raises(ValueError, match="level 3 out of range"):
        slide.read_region((0, 0), 3, (10, 10))
    with pytest.raises(ValueError, match="size must be positive"):
        slide.read_region((0, 0), 0, (0, 10))


def test_read_tile_resizes_to_tile_size(slide):
    tile = slide.read_tile((800, 900), 0, read_size=448, tile_size=224)
    assert tile.size == (224, 224) and tile.mode == "RGB"
    full = Image.fromarray(slide.read_region((800, 900), 0, (448, 448)))
    # a 2x reduction keeps the mean colour
    assert np.abs(np.asarray(tile, float).mean((0, 1)) - np.asarray(full, float).mean((0, 1))).max() < 2


def test_thumbnail_keeps_aspect_and_colour(slide):
    thumb = slide.thumbnail(512)
    assert thumb.shape == (512, 383, 3) and thumb.dtype == np.uint8
    full_mean = slide.read_region((0, 0), 0, slide.dimensions).reshape(-1, 3).mean(0)
    assert np.abs(thumb.reshape(-1, 3).mean(0) - full_mean).max() < 2


def test_pyramid_levels_and_best_level(tmp_path, slide):
    level0 = slide.read_region((0, 0), 0, (1024, 768))  # (768, 1024, 3) real tissue
    path = tmp_path / "pyramid.tif"
    write_pyramid_tiff(path, level0, mpp=0.25)
    with open_slide(path) as pyramid:
        assert pyramid.level_count == 3
        assert pyramid.level_dimensions == ((1024, 768), (512, 384), (256, 192))
        assert pyramid.level_downsamples == (1.0, 2.0, 4.0)
        assert pyramid.mpp == pytest.approx(0.25)  # from the TIFF resolution tags
        assert [pyramid.best_level_for_downsample(d) for d in (0.5, 1.0, 1.9, 2.0, 2.01, 3.9, 4.0, 100)] == [
            0, 0, 0, 1, 1, 1, 2, 2,
        ]  # fmt: skip
        # level 1 at level-0 (200, 100) is level 0 at (200, 100) shrunk 2x
        coarse = pyramid.read_region((200, 100), 1, (64, 64)).astype(float)
        fine = np.asarray(Image.fromarray(level0[100:228, 200:328]).resize((64, 64), Image.Resampling.BOX), float)
        assert np.abs(coarse - fine).mean() < 1.0
        with pytest.raises(ValueError, match="downsample must be positive"):
            pyramid.best_level_for_downsample(0)


def test_plain_png_has_no_mpp(tmp_path):
    path = sample_ihc_path()
    with open_slide(path) as image:
        assert image.backend == "pil"
        assert image.dimensions == (512, 512) and image.level_count == 1
        assert image.mpp is None and image.objective_power is None
        with pytest.raises(MissingMPPError, match=str(path)) as error:
            image.require_mpp()
        assert "mpp_override" in str(error.value) and "--mpp-override" in str(error.value)
        expected = np.asarray(Image.open(path).convert("RGB"))[10:60, 20:90]
        np.testing.assert_array_equal(image.read_region((20, 10), 0, (70, 50)), expected)
    with open_slide(path, mpp_override=0.5) as image:
        assert image.mpp == 0.5 and image.require_mpp() == 0.5


def test_mpp_override_replaces_metadata(svs_path):
    with open_slide(svs_path, mpp_override=0.25) as slide:
        assert slide.mpp == 0.25
    with pytest.raises(ValueError, match="mpp_override must be a positive"):
        open_slide(svs_path, mpp_override=-1)


def test_rgba_is_composited_on_white(tmp_path):
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., 0] = 200  # red everywhere, but only the left half is opaque
    rgba[:, :15, 3] = 255
    path = tmp_path / "half_transparent.png"
    Image.fromarray(rgba, "RGBA").save(path)
    with open_slide(path) as image:
        pixels = image.read_region((0, 0), 0, (30, 20))
    assert (pixels[:, :15] == (200, 0, 0)).all()
    assert (pixels[:, 15:] == 255).all()
    assert to_rgb_array(np.zeros((4, 4), np.uint8)).shape == (4, 4, 3)


def test_tiff_without_resolution_has_no_mpp(tmp_path):
    path = tmp_path / "no_resolution.tif"
    tifffile.imwrite(path, np.full((64, 64, 3), 200, np.uint8), photometric="rgb")
    with open_slide(path) as slide:
        assert slide.mpp is None
        with pytest.raises(MissingMPPError, match="no_resolution.tif"):
            slide.require_mpp()


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # PIL, on the truncated TIFF header
def test_corrupt_file_raises_slide_error_naming_it(tmp_path):
    path = tmp_path / "corrupt.svs"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(SlideError, match="corrupt.svs") as error:
        open_slide(path)
    assert isinstance(error.value, ValueError)
    assert "tiffslide" in str(error.value)  # says what was tried
    truncated = tmp_path / "truncated.svs"
    truncated.write_bytes(sample_slide_path().read_bytes()[:2000])
    with pytest.raises(SlideError, match="truncated.svs"):
        open_slide(truncated)


def test_missing_file_and_bad_backend(tmp_path, svs_path):
    with pytest.raises(FileNotFoundError, match="nothing.svs"):
        open_slide(tmp_path / "nothing.svs")
    with pytest.raises(ValueError, match="backend must be one of"):
        open_slide(svs_path, backend="bioformats")


def test_close_releases_reader(svs_path):
    slide = open_slide(svs_path)
    slide.close()
    slide.close()  # idempotent
    with pytest.raises(SlideError, match="closed slide"):
        slide.read_region((0, 0), 0, (10, 10))


def test_thumbnail_of_a_slide_without_pyramid_is_read_once_in_strips(tmp_path, slide, monkeypatch):
    """Tissue detection and its overlay on a 6000x6000 single-level TIFF: one strip in memory at a time, one pass."""
    import tracemalloc

    import tiffslide

    from histomim.data import slides as slides_module
    from histomim.data.tissue import detect_tissue, save_tissue_overlay

    level0 = np.tile(slide.read_region((0, 0), 0, (2000, 2000)), (3, 3, 1))  # (6000, 6000, 3) real tissue
    path = tmp_path / "flat.tif"
    tifffile.imwrite(
        path, level0, photometric="rgb", tile=(256, 256), resolution=(4e4, 4e4), resolutionunit="CENTIMETER"
    )  # 0.25 um/px
    strip_pixels = 2**20  # a small budget, so that the 36 Mpx image is read as ~35 strips
    monkeypatch.setattr(slides_module, "_THUMBNAIL_STRIP_PIXELS", strip_pixels)
    reads: list[tuple[int, int]] = []
    read_region = tiffslide.TiffSlide.read_region

    def recording_read_region(self, location, level, size, *args, **kwargs):
        reads.append(tuple(size))
        return read_region(self, location, level, size, *args, **kwargs)

    monkeypatch.setattr(tiffslide.TiffSlide, "read_region", recording_read_region)

    with open_slide(path) as flat:
        assert flat.level_count == 1 and flat.mpp == pytest.approx(0.25)
        tracemalloc.start()
        tissue = detect_tissue(flat)  # 4 um/px: a 375x375 thumbnail of 16x16 px boxes
        _, peak_bytes = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        detection_reads = list(reads)
        save_tissue_overlay(flat, tissue, tmp_path / "overlay.png")

    assert max(w * h for w, h in reads) <= strip_pixels
    assert sum(w * h for w, h in detection_reads) <= 1.02 * 6000 * 6000  # all of level 0, strips share a boundary row
    assert reads == detection_reads  # the overlay reuses the thumbnail instead of reading level 0 again
    # 108 MB image: a whole-level read held it 2-3 times; now ~3 MB strips plus the mask arithmetic on the thumbnail
    assert peak_bytes < level0.nbytes / 4
    reference = np.asarray(Image.fromarray(level0).resize((375, 375), Image.Resampling.BOX))
    difference = np.abs(tissue.thumbnail.astype(int) - reference)
    # equal but where a strip boundary falls on a tie of the box filter (one level row of 16 in or out)
    assert tissue.thumbnail.shape == (375, 375, 3) and difference.max() <= 255 / 16 and (difference > 0).mean() < 0.01
