"""Radiology loaders and encoders on real scans: pydicom's CT and MR examples, nibabel's anatomical MR volume."""

from __future__ import annotations

import gzip
import importlib.resources
import shutil
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pydicom.examples
import pytest
import torch

from histomim.data.radiology import (
    CT_WINDOWS,
    crop_or_pad,
    load_scan,
    read_dicom,
    read_nifti,
    resample,
    window_intensity,
)
from histomim.multimodal.radiology import RadiologyEncoder


@pytest.fixture(scope="module")
def ct_path() -> Path:
    return Path(pydicom.examples.get_path("ct"))


@pytest.fixture(scope="module")
def mr_path() -> Path:
    return Path(pydicom.examples.get_path("mr"))


@pytest.fixture(scope="module")
def nifti_path() -> Path:
    return Path(str(importlib.resources.files("nibabel") / "tests" / "data" / "anatomical.nii"))


def test_ct_is_read_in_hounsfield_units(ct_path):
    dataset = pydicom.dcmread(ct_path)
    scan = read_dicom(ct_path)
    assert scan.pixels.shape == (1, 128, 128)
    assert scan.spacing == pytest.approx([float(v) for v in dataset.PixelSpacing])
    expected = dataset.pixel_array.astype(np.float32) * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
    np.testing.assert_array_equal(scan.pixels[0].numpy(), expected)
    assert scan.pixels.min() < -500  # air around the body, in HU (raw values are all positive)


def test_soft_tissue_window_maps_hu_to_unit_range(ct_path):
    hu = read_dicom(ct_path).pixels
    center, width = CT_WINDOWS["soft_tissue"]
    windowed = window_intensity(hu, center, width)
    assert windowed.min() == 0 and windowed.max() == 1
    inside = (hu > center - width / 2) & (hu < center + width / 2)
    torch.testing.assert_close(windowed[inside], (hu[inside] - (center - width / 2)) / width)
    assert torch.all(windowed[hu <= center - width / 2] == 0) and torch.all(windowed[hu >= center + width / 2] == 1)
    torch.testing.assert_close(load_scan(ct_path, window="soft_tissue"), windowed)
    with pytest.raises(ValueError, match="window width must be positive"):
        window_intensity(hu, 40, 0)
    with pytest.raises(ValueError, match="unknown window 'abdomen'"):
        load_scan(ct_path, window="abdomen")


def test_auto_window_uses_the_window_stored_in_the_mr(mr_path):
    dataset = pydicom.dcmread(mr_path)
    scan = read_dicom(mr_path)
    assert scan.window == (float(dataset.WindowCenter), float(dataset.WindowWidth))
    expected = window_intensity(scan.pixels, *scan.window)
    torch.testing.assert_close(load_scan(mr_path), expected)
    # without a window: min-max to [0, 1]
    minmax = load_scan(mr_path, window=None)
    assert minmax.min() == 0 and minmax.max() == 1


def test_dicom_series_is_sorted_along_the_slice_normal(ct_path, tmp_path):
    """Three copies of the real CT slice at z = 0, 2.5, 5 mm, written in shuffled file order."""
    series = tmp_path / "series"
    series.mkdir()
    base = pydicom.dcmread(ct_path)
    for name, z, offset in (("b.dcm", 5.0, 200), ("a.dcm", 0.0, 0), ("c.dcm", 2.5, 100)):
        dataset = pydicom.dcmread(ct_path)
        dataset.ImagePositionPatient = [*base.ImagePositionPatient[:2], z]
        dataset.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        dataset.PixelData = (dataset.pixel_array + offset).astype(dataset.pixel_array.dtype).tobytes()
        dataset.save_as(series / name)

    scan = read_dicom(series)
    assert scan.pixels.shape == (1, 3, 128, 128)
    assert scan.spacing[0] == pytest.approx(2.5)
    first = scan.pixels[0, 0]
    torch.testing.assert_close(scan.pixels[0, 1] - first, torch.full_like(first, 100.0))
    torch.testing.assert_close(scan.pixels[0, 2] - first, torch.full_like(first, 200.0))

    volume = load_scan(series, window="soft_tissue", target_spacing=(5.0, 1.0, 1.0), size=(2, 64, 64))
    assert volume.shape == (1, 2, 64, 64)


def test_nifti_is_read_in_ras_order_with_spacing(nifti_path):
    scan = read_nifti(nifti_path)
    canonical = nibabel.as_closest_canonical(nibabel.load(nifti_path))
    x, y, z = canonical.shape
    assert scan.pixels.shape == (1, z, y, x)
    assert scan.spacing == (2.0, 2.0, 2.0)
    np.testing.assert_allclose(scan.pixels[0].numpy(), canonical.get_fdata().transpose(2, 1, 0))


def test_compressed_nifti_resampled_to_spacing_and_size(nifti_path, tmp_path):
    compressed = tmp_path / "anatomical.nii.gz"
    with open(nifti_path, "rb") as source, gzip.open(compressed, "wb") as target:
        shutil.copyfileobj(source, target)

    resampled = load_scan(compressed, target_spacing=4.0)  # 2 mm -> 4 mm halves every axis
    _, depth, height, width = read_nifti(nifti_path).pixels.shape
    assert resampled.shape == (1, round(depth / 2), round(height / 2), round(width / 2))
    assert 0.0 <= resampled.min() and resampled.max() <= 1.0

    fixed = load_scan(compressed, target_spacing=4.0, size=16)  # same scale, centre-cropped/padded
    assert fixed.shape == (1, 16, 16, 16)
    assert load_scan(compressed, size=(8, 12, 10)).shape == (1, 8, 12, 10)


def test_resample_and_crop_or_pad_geometry():
    image = torch.arange(16.0).view(1, 4, 4)
    padded = crop_or_pad(image, (6, 2))
    assert padded.shape == (1, 6, 2)
    torch.testing.assert_close(padded[0, 1:5], image[0, :, 1:3])  # centred
    assert padded[0, 0].abs().sum() == 0 and padded[0, 5].abs().sum() == 0
    torch.testing.assert_close(resample(image, (1.0, 1.0), target_spacing=1.0), image)
    with pytest.raises(ValueError, match="needs the 2 voxel spacings"):
        resample(image, None, target_spacing=2.0)
    with pytest.raises(ValueError, match="must have 2 entries"):
        resample(image, size=(4, 4, 4))


def test_missing_files_raise_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.dcm"):
        load_scan(tmp_path / "missing.dcm")
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        load_scan(tmp_path / "missing.nii.gz")
    (tmp_path / "empty_series").mkdir()
    with pytest.raises(FileNotFoundError, match="empty_series holds no files"):
        read_dicom(tmp_path / "empty_series")


def test_corrupt_files_raise_value_error_naming_the_file(ct_path, nifti_path, tmp_path):
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"this is not a DICOM file" * 20)
    with pytest.raises(ValueError, match="garbage.dcm is not a readable DICOM file"):
        load_scan(garbage)

    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(ct_path.read_bytes()[: ct_path.stat().st_size // 2])  # pixel data cut in half
    with pytest.raises(ValueError, match="truncated.dcm"):
        load_scan(truncated)

    no_pixels = pydicom.dcmread(ct_path)
    del no_pixels.PixelData
    no_pixels.save_as(tmp_path / "no_pixels.dcm")
    with pytest.raises(ValueError, match="no_pixels.dcm has no pixel data"):
        read_dicom(tmp_path / "no_pixels.dcm")

    broken_nifti = tmp_path / "broken.nii"
    broken_nifti.write_bytes(nifti_path.read_bytes()[:200])  # header cut short
    with pytest.raises(ValueError, match="broken.nii is not a readable NIfTI file"):
        load_scan(broken_nifti)

    series = tmp_path / "mixed_series"
    series.mkdir()
    shutil.copy(ct_path, series / "1.dcm")
    mr = pydicom.dcmread(pydicom.examples.get_path("mr"))
    mr.SeriesInstanceUID = pydicom.dcmread(ct_path).SeriesInstanceUID  # claims to be a slice of the CT series
    mr.save_as(series / "2.dcm")
    with pytest.raises(ValueError, match=r"2.dcm has shape \(64, 64\)"):
        read_dicom(series)


@pytest.mark.parametrize("spatial_dims, shape", [(2, (3, 1, 48, 48)), (3, (2, 1, 12, 24, 20))])
def test_encoder_on_real_scans(spatial_dims, shape, ct_path, nifti_path):
    torch.manual_seed(0)
    path = ct_path if spatial_dims == 2 else nifti_path
    scan = load_scan(path, size=shape[2:])  # (1, *spatial) in [0, 1]
    images = scan.expand(shape).clone()
    images[1] = images[1].flip(-1)  # a mirrored copy should not embed identically
    encoder = RadiologyEncoder(spatial_dims, in_channels=1, channels=(8, 16), hidden_size=32).eval()
    with torch.no_grad():
        embedding = encoder(images)
    assert embedding.shape == (shape[0], 32)
    assert torch.isfinite(embedding).all()
    assert not torch.allclose(embedding[0], embedding[1])
    with pytest.raises(ValueError, match="C=1"):
        encoder(images.repeat_interleave(2, dim=1))


# -- DICOM and NIfTI of one volume --------------------------------------------------------------

# How a scanner lays out its slices, as voxel indices (x, y, z) of anatomical.nii (an LAS volume:
# x runs to the patient's left, y to anterior, z to superior) for stored pixel (row, column) of slice k.
SLICE_LAYOUTS = {
    # axial, IOP [1,0,0, 0,1,0]: columns run to the left, rows to posterior, slices to superior
    "axial": lambda shape: (shape[2], shape[1], shape[0], lambda r, c, k: (c, shape[1] - 1 - r, k)),
    # sagittal, IOP [0,1,0, 0,0,-1]: columns run to posterior, rows to inferior, slices to the left
    "sagittal": lambda shape: (shape[0], shape[2], shape[1], lambda r, c, k: (k, shape[1] - 1 - c, shape[2] - 1 - r)),
}


def _dicom_slices(data: np.ndarray, affine: np.ndarray, layout: str):
    """``(pixels (rows, cols) int16, orientation, position, (row, column) spacing)`` per stored slice, in LPS.

    Written from DICOM's definition of the plane tags: pixel (r, c) lies at
    ``ImagePositionPatient + c * column_spacing * row_direction + r * row_spacing * column_direction``.
    """
    n_slices, rows, columns, voxel = SLICE_LAYOUTS[layout](data.shape)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # NIfTI's RAS -> DICOM's LPS

    def position(index):
        return (lps @ [*index, 1.0])[:3]

    for k in range(n_slices):
        pixels = np.array([[data[voxel(r, c, k)] for c in range(columns)] for r in range(rows)], dtype=np.int16)
        origin = position(voxel(0, 0, k))
        along_row, down_column = position(voxel(0, 1, k)) - origin, position(voxel(1, 0, k)) - origin
        column_spacing, row_spacing = np.linalg.norm(along_row), np.linalg.norm(down_column)
        orientation = [*(along_row / column_spacing), *(down_column / row_spacing)]
        yield pixels, orientation, origin, (row_spacing, column_spacing)


def _dicom_template(series_uid: str):
    from pydicom.uid import generate_uid

    dataset = pydicom.dcmread(pydicom.examples.get_path("mr"))  # a real MR header to carry the new pixels
    dataset.SeriesInstanceUID = series_uid
    dataset.SOPInstanceUID = generate_uid()
    del dataset.WindowCenter, dataset.WindowWidth  # the NIfTI has no display window: both get min-max scaling
    return dataset


def write_dicom_series(folder: Path, nifti_path: Path, layout: str) -> str:
    """Write the NIfTI volume as a DICOM series, one slice per file in shuffled file order; return its UID."""
    from pydicom.uid import generate_uid

    image = nibabel.load(nifti_path)
    folder.mkdir()
    series_uid = generate_uid()
    slices = list(_dicom_slices(np.asarray(image.dataobj), image.affine, layout))
    names = np.random.default_rng(0).permutation(len(slices))  # file order says nothing about position
    for k, (pixels, orientation, position, spacing) in enumerate(slices):
        dataset = _dicom_template(series_uid)
        dataset.set_pixel_data(pixels, photometric_interpretation="MONOCHROME2", bits_stored=16)
        dataset.ImageOrientationPatient = [round(float(v), 6) for v in orientation]
        dataset.ImagePositionPatient = [round(float(v), 4) for v in position]
        dataset.PixelSpacing = [round(float(v), 6) for v in spacing]
        dataset.InstanceNumber = k + 1
        dataset.save_as(folder / f"IM{names[k]:04d}.dcm")
    return series_uid


@pytest.mark.parametrize("layout", sorted(SLICE_LAYOUTS))
def test_dicom_series_and_nifti_of_one_volume_load_identically(layout, nifti_path, tmp_path):
    """Today's bug: DICOM kept its stored row/column order, a 180-degree rotation away from the NIfTI."""
    write_dicom_series(tmp_path / "series", nifti_path, layout)
    dicom, nifti = read_dicom(tmp_path / "series"), read_nifti(nifti_path)
    assert dicom.pixels.shape == nifti.pixels.shape == (1, 25, 41, 33)  # (C, superior, anterior, right)
    torch.testing.assert_close(dicom.pixels, nifti.pixels, rtol=0, atol=0)
    assert dicom.spacing == pytest.approx(nifti.spacing)
    torch.testing.assert_close(load_scan(tmp_path / "series", size=16), load_scan(nifti_path, size=16))


def test_enhanced_multiframe_dicom_is_reoriented_from_its_functional_groups(nifti_path, tmp_path):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import generate_uid

    image = nibabel.load(nifti_path)
    slices = list(_dicom_slices(np.asarray(image.dataobj), image.affine, "sagittal"))
    slices = slices[::-1]  # frames stored in the file out of order
    dataset = _dicom_template(generate_uid())
    dataset.set_pixel_data(np.stack([s[0] for s in slices]), photometric_interpretation="MONOCHROME2", bits_stored=16)
    del dataset.ImageOrientationPatient, dataset.ImagePositionPatient, dataset.PixelSpacing  # only in the groups

    def item(**sequences) -> Dataset:
        group = Dataset()
        for name, (keyword, value) in sequences.items():
            inner = Dataset()
            setattr(inner, keyword, [round(float(v), 6) for v in value])
            setattr(group, name, DicomSequence([inner]))
        return group

    _, orientation, _, spacing = slices[0]
    dataset.SharedFunctionalGroupsSequence = DicomSequence(
        [
            item(
                PlaneOrientationSequence=("ImageOrientationPatient", orientation),
                PixelMeasuresSequence=("PixelSpacing", spacing),
            )
        ]
    )
    dataset.PerFrameFunctionalGroupsSequence = DicomSequence(
        [item(PlanePositionSequence=("ImagePositionPatient", position)) for _, _, position, _ in slices]
    )
    dataset.save_as(tmp_path / "volume.dcm")

    scan, nifti = read_dicom(tmp_path / "volume.dcm"), read_nifti(nifti_path)
    torch.testing.assert_close(scan.pixels, nifti.pixels, rtol=0, atol=0)
    assert scan.spacing == pytest.approx(nifti.spacing)

    del dataset.PerFrameFunctionalGroupsSequence
    dataset.save_as(tmp_path / "no_positions.dcm")
    with pytest.raises(ValueError, match="no_positions.dcm has 33 frames but no per-frame positions"):
        read_dicom(tmp_path / "no_positions.dcm")


def test_a_folder_with_several_series_is_refused_unless_one_is_chosen(ct_path, nifti_path, tmp_path):
    folder = tmp_path / "study"
    series_uid = write_dicom_series(folder, nifti_path, "axial")
    shutil.copy(ct_path, folder / "ct.dcm")  # another series of the same patient's study
    ct_uid = pydicom.dcmread(ct_path).SeriesInstanceUID
    with pytest.raises(ValueError, match=rf"study holds 2 series: .*{series_uid} \(25 files\).*{ct_uid} \(1 files\)"):
        read_dicom(folder)
    torch.testing.assert_close(read_dicom(folder, series_uid=series_uid).pixels, read_nifti(nifti_path).pixels)
    torch.testing.assert_close(load_scan(folder, series_uid=ct_uid), load_scan(ct_path))  # the CT alone
    with pytest.raises(ValueError, match=r"has no series '1\.2\.3'"):
        read_dicom(folder, series_uid="1.2.3")


def test_series_slices_without_position_or_at_one_position_are_refused(nifti_path, tmp_path):
    write_dicom_series(tmp_path / "series", nifti_path, "axial")
    files = sorted((tmp_path / "series").iterdir())
    duplicate = pydicom.dcmread(files[0])
    duplicate.SOPInstanceUID = pydicom.uid.generate_uid()
    duplicate.save_as(tmp_path / "series" / "copy.dcm")
    with pytest.raises(ValueError, match="lie at the same position"):
        read_dicom(tmp_path / "series")
    unplaced = pydicom.dcmread(files[1])
    del unplaced.ImagePositionPatient
    unplaced.save_as(tmp_path / "series" / "copy.dcm")
    with pytest.raises(ValueError, match="copy.dcm has no ImagePositionPatient"):
        read_dicom(tmp_path / "series")
