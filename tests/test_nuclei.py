"""Nucleus detection without labels (`histomim.data.nuclei`), checked against the real HoVer-Net instance maps of
the cellseg sample patches, and the nucleus-centred tiles cut from it."""

import numpy as np
import pytest
import scipy.io
from PIL import Image

from histomim.data.nuclei import cut_nucleus_tiles, find_nuclei, otsu_threshold
from histomim.data.samples import sample_nuclei_pairs


@pytest.fixture(scope="module")
def labelled_patches():
    """(RGB image, instance map) of the three real labelled patches."""
    return [(Image.open(image).convert("RGB"), scipy.io.loadmat(mask)["inst_map"]) for image, mask in sample_nuclei_pairs()]


def test_otsu_threshold_separates_two_modes():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.1, 0.02, 5000), rng.normal(0.6, 0.05, 2000)])
    threshold = otsu_threshold(values)  # anywhere in the empty gap maximises the between-class variance
    assert (values[:5000] < threshold).mean() > 0.99 and (values[5000:] > threshold).all()


@pytest.mark.parametrize("patch", [1, 2])  # patch1.png is annotated only in part, so precision there means little
def test_centres_fall_on_real_nuclei_and_find_most_of_them(labelled_patches, patch):
    image, instances = labelled_patches[patch]
    centres = find_nuclei(image)  # (N, 2) x, y
    hit = instances[centres[:, 1], centres[:, 0]]  # instance id under each centre, 0 = background
    nuclei = set(np.unique(instances)) - {0}
    assert (hit > 0).mean() >= 0.9  # centres on nuclei
    assert len(set(hit[hit > 0])) >= 0.8 * len(nuclei)  # most nuclei found
    assert len(centres) <= 1.3 * len(nuclei)  # not one per pixel of a nucleus


def test_no_nuclei_on_a_blank_image_and_a_clear_error_on_a_degenerate_one():
    assert find_nuclei(Image.new("RGB", (64, 64), (245, 240, 242))).shape == (0, 2)
    with pytest.raises(ValueError, match="at least 2 x 2 px, got 1 x 1"):
        find_nuclei(Image.new("RGB", (1, 1)))


def test_nucleus_tiles_are_centred_whole_and_reused(labelled_patches, tmp_path):
    image, _ = labelled_patches[2]
    centres = find_nuclei(image)
    count = cut_nucleus_tiles(image, tmp_path, "patch3", size=40)
    inside = [(x, y) for x, y in centres if 20 <= x <= image.width - 20 and 20 <= y <= image.height - 20]
    files = sorted(tmp_path.glob("patch3_nucleus40_*.png"))
    assert count == len(files) == len(inside) > 0  # centres nearer the border than 20 px have no whole tile
    x, y = inside[0]
    tile = np.asarray(Image.open(tmp_path / f"patch3_nucleus40_{x}_{y}.png"))
    assert tile.shape == (40, 40, 3)
    assert np.array_equal(tile[20, 20], np.asarray(image)[y, x])  # the centre pixel is the nucleus centre
    before = {f: f.stat().st_mtime_ns for f in files}
    assert cut_nucleus_tiles(image, tmp_path, "patch3", size=40) == count
    assert {f: f.stat().st_mtime_ns for f in files} == before  # existing tiles are not rewritten
