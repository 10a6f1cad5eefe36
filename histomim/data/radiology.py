"""Radiology scans as tensors: DICOM and NIfTI readers, intensity windowing, resampling.

A scan becomes a float tensor ``(C, H, W)`` (slice) or ``(C, D, H, W)`` (volume) in ``[0, 1]``:

1. read the voxels in physical units (:func:`read_dicom` applies RescaleSlope/Intercept, so CT is in
   Hounsfield units) together with the voxel spacing in mm; volumes, NIfTI or DICOM, are reoriented to
   the same RAS axes so that one scan stored either way gives one array;
2. window the intensities (:func:`window_intensity`, e.g. the soft-tissue CT window 40/400 HU);
3. resample to a common spacing and/or size (:func:`resample`, torch interpolation).

:func:`load_scan` chains the three for one file (or DICOM series directory). The encoders that consume
these tensors live in :mod:`histomim.multimodal.radiology`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# Standard CT display windows as (center, width) in Hounsfield units.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "soft_tissue": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "liver": (60.0, 160.0),
}
NIFTI_SUFFIXES = (".nii", ".nii.gz")


class Scan(NamedTuple):
    """Voxels in physical units and their spacing."""

    pixels: Tensor  # (C, H, W) or (C, D, H, W) float32
    spacing: tuple[float, ...]  # mm per voxel along each spatial axis, in the same order as `pixels`
    window: tuple[float, float] | None = None  # the window stored in the file (DICOM), if any


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def _read_dicom_dataset(path: Path):
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError as error:
        raise ImportError(f"reading {path} needs pydicom: pip install 'histomim[radiology]'") from error

    if not path.is_file():
        raise FileNotFoundError(f"DICOM file not found: {path}")
    try:
        dataset = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError) as error:
        raise ValueError(f"{path} is not a readable DICOM file: {error}") from error
    if "PixelData" not in dataset:
        raise ValueError(f"DICOM file {path} has no pixel data")
    return dataset


def _dicom_pixels(dataset, path: Path) -> np.ndarray:
    """Stored values -> modality units (HU for CT): ``value * RescaleSlope + RescaleIntercept``."""
    try:
        pixels = dataset.pixel_array.astype(np.float32)  # (H, W) or (frames, H, W)
    except Exception as error:  # pydicom raises many types for truncated or undecodable pixel data
        raise ValueError(f"cannot decode the pixel data of DICOM file {path}: {error}") from error
    if dataset.get("PhotometricInterpretation", "MONOCHROME2") not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"DICOM file {path} is {dataset.PhotometricInterpretation}, expected a grayscale image")
    slope = float(dataset.get("RescaleSlope", 1.0))
    intercept = float(dataset.get("RescaleIntercept", 0.0))
    return pixels * slope + intercept


def _first(value) -> float:
    """DICOM multi-valued numbers (e.g. several display windows): take the first."""
    return float(value[0]) if isinstance(value, Sequence) and not isinstance(value, str) else float(value)


def _dicom_window(dataset) -> tuple[float, float] | None:
    if "WindowCenter" in dataset and "WindowWidth" in dataset:
        return _first(dataset.WindowCenter), _first(dataset.WindowWidth)
    return None


class _Plane(NamedTuple):
    """Where one 2-D frame of a DICOM file lies in patient space (DICOM's LPS millimetres)."""

    orientation: np.ndarray  # (6,) ImageOrientationPatient: unit vectors along a row, then down a column
    position: np.ndarray  # (3,) ImagePositionPatient: centre of the first (top-left) pixel
    spacing: tuple[float, float]  # PixelSpacing: (between rows, between columns) in mm


def _plane(item, fallback, path: Path, what: str) -> _Plane:
    """The plane tags of ``item`` (a dataset or a functional-group item), missing ones taken from ``fallback``."""

    def tag(sequence: str, keyword: str, default=None):
        # enhanced multi-frame files nest each tag in a functional-group sequence; classic files hold it directly
        for source in (item, fallback):
            if source is None:
                continue
            if keyword in source:
                return source[keyword].value
            if sequence in source and len(source[sequence].value) and keyword in source[sequence].value[0]:
                return source[sequence].value[0][keyword].value
        if default is not None:
            return default
        raise ValueError(
            f"DICOM file {path} has no {keyword} for {what}: cannot place it in the volume "
            f"(a series needs ImageOrientationPatient and ImagePositionPatient on every slice)"
        )

    orientation = np.asarray(tag("PlaneOrientationSequence", "ImageOrientationPatient"), dtype=float)
    position = np.asarray(tag("PlanePositionSequence", "ImagePositionPatient"), dtype=float)
    row_spacing, column_spacing = (float(v) for v in tag("PixelMeasuresSequence", "PixelSpacing", (1.0, 1.0)))
    return _Plane(orientation, position, (row_spacing, column_spacing))


def _frame_planes(dataset, n_frames: int, path: Path) -> list[_Plane]:
    """One `_Plane` per frame: from the per-frame functional groups of a multi-frame file, else the top-level tags."""
    if "PerFrameFunctionalGroupsSequence" in dataset:
        shared = dataset.get("SharedFunctionalGroupsSequence")
        shared = shared[0] if shared else None
        frames = dataset.PerFrameFunctionalGroupsSequence
        if len(frames) != n_frames:
            raise ValueError(f"DICOM file {path} has {n_frames} frames but {len(frames)} per-frame functional groups")
        return [_plane(frame, shared, path, f"frame {i}") for i, frame in enumerate(frames)]
    if n_frames > 1:
        raise ValueError(
            f"DICOM file {path} has {n_frames} frames but no per-frame positions (PerFrameFunctionalGroupsSequence): "
            f"cannot place its frames in the volume"
        )
    return [_plane(dataset, None, path, "its slice")]


def _series_datasets(folder: Path, series_uid: str | None) -> list[tuple[object, Path]]:
    """The files of one series in ``folder``, grouped by SeriesInstanceUID; several series need ``series_uid``."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"DICOM series directory {folder} holds no files")
    series: dict[str, list[tuple[object, Path]]] = {}
    for file in files:
        dataset = _read_dicom_dataset(file)
        series.setdefault(str(dataset.get("SeriesInstanceUID", "")), []).append((dataset, file))
    found = ", ".join(f"{uid or '(no SeriesInstanceUID)'} ({len(members)} files)" for uid, members in series.items())
    if series_uid is not None:
        if series_uid not in series:
            raise ValueError(f"DICOM folder {folder} has no series {series_uid!r}; it holds {found}")
        return series[series_uid]
    if len(series) > 1:
        raise ValueError(f"DICOM folder {folder} holds {len(series)} series: {found}; choose one with series_uid=...")
    return next(iter(series.values()))


def _dicom_affine(planes: list[_Plane], files: list[Path]) -> np.ndarray:
    """RAS affine of a stack of parallel frames sorted along their normal; voxel index order (column, row, frame)."""
    orientation = planes[0].orientation
    for plane, file in zip(planes, files):
        if not np.allclose(plane.orientation, orientation, atol=1e-4):
            raise ValueError(
                f"DICOM file {file} is oriented {plane.orientation.tolist()}, but {files[0]} is "
                f"{orientation.tolist()}: slices of one volume must be parallel"
            )
    row_direction, column_direction = orientation[:3], orientation[3:]  # LPS unit vectors
    row_spacing, column_spacing = planes[0].spacing
    positions = np.stack([plane.position for plane in planes])  # (D, 3)
    steps = np.linalg.norm(np.diff(positions, axis=0), axis=1)  # (D-1,)
    if len(steps) and steps.min() < 1e-3:
        i = int(steps.argmin())
        raise ValueError(f"DICOM files {files[i]} and {files[i + 1]} lie at the same position {positions[i].tolist()}")
    slice_step = (
        (positions[-1] - positions[0]) / (len(planes) - 1)
        if len(planes) > 1
        else np.cross(row_direction, column_direction)
    )
    lps = np.eye(4)
    lps[:3, 0] = row_direction * column_spacing  # moving along a row = next column
    lps[:3, 1] = column_direction * row_spacing  # moving down a column = next row
    lps[:3, 2] = slice_step
    lps[:3, 3] = positions[0]
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # DICOM's LPS -> NIfTI's RAS


def _canonical_scan(data: np.ndarray, affine: np.ndarray) -> Scan:
    """Reorient ``(X, Y, Z)`` or ``(X, Y, Z, C)`` voxels with a RAS ``affine`` to the closest RAS axes, as nibabel does.

    Returns ``(C, D, H, W)`` with ``D, H, W`` = superior, anterior, right, and the spacing of those axes.
    NIfTI and DICOM volumes both come through here, so the same anatomy gives the same array.
    """
    try:
        from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform
    except ImportError as error:
        raise ImportError("reorienting a volume to RAS needs nibabel: pip install 'histomim[radiology]'") from error

    to_ras = ornt_transform(io_orientation(affine), axcodes2ornt("RAS"))
    canonical = apply_orientation(data, to_ras)  # (R, A, S) or (R, A, S, C)
    canonical_affine = affine @ inv_ornt_aff(to_ras, data.shape[:3])
    volume = torch.from_numpy(np.ascontiguousarray(canonical, dtype=np.float32))
    volume = volume.permute(2, 1, 0)[None] if volume.ndim == 3 else volume.permute(3, 2, 1, 0)  # (C, S, A, R)
    spacing = np.linalg.norm(canonical_affine[:3, :3], axis=0)  # (3,) mm along R, A, S
    return Scan(volume, tuple(float(s) for s in reversed(spacing)))


def read_dicom(path: str | os.PathLike, series_uid: str | None = None) -> Scan:
    """Read a DICOM file or a directory holding a series.

    - A single-frame file is one slice ``(1, H, W)`` in its stored (display) row/column order.
    - A series directory or a multi-frame file is a volume ``(1, D, H, W)`` reoriented like
      :func:`read_nifti` (``D, H, W`` = superior, anterior, right): the affine is built from
      ImageOrientationPatient, ImagePositionPatient and PixelSpacing, so a DICOM series and a NIfTI file of
      the same scan come out as the same array. Spacing is in mm along those axes.

    Args:
        series_uid: the SeriesInstanceUID to read from a directory holding several series.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: a file is not DICOM or has no or undecodable pixel data; the directory holds several
            series and none was chosen; slices differ in size or orientation, share a position or lack the
            orientation/position tags (the message names the file).
    """
    path = Path(path)
    datasets = _series_datasets(path, series_uid) if path.is_dir() else [(_read_dicom_dataset(path), path)]

    # 1. every frame with its plane in patient space
    frames: list[tuple[np.ndarray, _Plane, Path]] = []  # (H, W) pixels, plane, file
    for dataset, file in datasets:
        pixels = _dicom_pixels(dataset, file)  # (H, W) or (frames, H, W)
        pixels = pixels[None] if pixels.ndim == 2 else pixels
        if len(datasets) == 1 and len(pixels) == 1:
            row_spacing, column_spacing = (float(v) for v in dataset.get("PixelSpacing", (1.0, 1.0)))
            return Scan(torch.from_numpy(pixels[0])[None], (row_spacing, column_spacing), _dicom_window(dataset))
        frames += [(frame, plane, file) for frame, plane in zip(pixels, _frame_planes(dataset, len(pixels), file))]
    first_pixels, _, first_file = frames[0]
    for pixels, _, file in frames:
        if pixels.shape != first_pixels.shape:
            raise ValueError(f"DICOM file {file} has shape {pixels.shape}, but {first_file} has {first_pixels.shape}")

    # 2. sort along the slice normal, then reorient the (column, row, slice) voxels with their affine
    orientation = frames[0][1].orientation
    normal = np.cross(orientation[:3], orientation[3:])
    frames.sort(key=lambda frame: float(np.dot(normal, frame[1].position)))
    affine = _dicom_affine([plane for _, plane, _ in frames], [file for _, _, file in frames])
    volume = np.stack([pixels for pixels, _, _ in frames]).transpose(2, 1, 0)  # (D, H, W) -> (columns, rows, slices)
    scan = _canonical_scan(volume, affine)
    return scan._replace(window=_dicom_window(datasets[0][0]))


def read_nifti(path: str | os.PathLike) -> Scan:
    """Read a NIfTI volume reoriented to RAS, as ``(C, D, H, W)`` with ``D, H, W`` = superior, anterior, right axes.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a readable NIfTI image (the message names it).
    """
    try:
        import nibabel as nib
    except ImportError as error:
        raise ImportError(f"reading {path} needs nibabel: pip install 'histomim[radiology]'") from error

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"NIfTI file not found: {path}")
    try:
        image = nib.load(path)
        data = np.asarray(image.get_fdata(dtype=np.float32))  # (X, Y, Z) or (X, Y, Z, C)
    except Exception as error:  # nibabel raises ImageFileError, EOFError, zlib errors, ... for broken files
        raise ValueError(f"{path} is not a readable NIfTI file: {error}") from error
    if data.ndim not in (3, 4):
        raise ValueError(f"NIfTI file {path} has {data.ndim} dimensions, expected a 3-D volume (or 4-D with channels)")
    return _canonical_scan(data, image.affine)


# ----------------------------------------------------------------------------------------------
# Intensity and geometry
# ----------------------------------------------------------------------------------------------


def window_intensity(pixels: Tensor, center: float, width: float) -> Tensor:
    """Map ``[center - width/2, center + width/2]`` linearly to ``[0, 1]``, clamping outside."""
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    return ((pixels - (center - width / 2)) / width).clamp(0.0, 1.0)


def rescale_intensity(pixels: Tensor) -> Tensor:
    """Min-max scale to ``[0, 1]`` (MR and other images without calibrated units)."""
    low, high = pixels.min(), pixels.max()
    return (pixels - low) / (high - low) if high > low else torch.zeros_like(pixels)


def crop_or_pad(pixels: Tensor, size: Sequence[int]) -> Tensor:
    """Centre crop or zero-pad the spatial axes of ``(C, *spatial)`` to ``size``, keeping the voxel scale."""
    for axis, target in enumerate(size, start=1):
        current = pixels.shape[axis]
        if current > target:
            start = (current - target) // 2
            pixels = pixels.narrow(axis, start, target)
        elif current < target:
            before = (target - current) // 2
            pad = [0, 0] * (pixels.ndim - 1)  # F.pad lists the last axis first
            last_first = pixels.ndim - 1 - axis
            pad[2 * last_first], pad[2 * last_first + 1] = before, target - current - before
            pixels = F.pad(pixels, pad)
    return pixels


def resample(
    pixels: Tensor,
    spacing: Sequence[float] | None = None,
    target_spacing: float | Sequence[float] | None = None,
    size: int | Sequence[int] | None = None,
) -> Tensor:
    """Resample ``(C, *spatial)`` to a voxel spacing and/or a fixed size (2-D or 3-D).

    - ``target_spacing`` (needs ``spacing``): linear interpolation to that many mm per voxel; with a
      ``size`` as well, the result is then centre-cropped/padded to ``size`` so that every scan has
      the same shape *and* the same physical scale;
    - ``size`` alone: linear interpolation straight to ``size``.
    """
    spatial_dims = pixels.ndim - 1
    if spatial_dims not in (2, 3):
        raise ValueError(f"resample expects (C, H, W) or (C, D, H, W), got shape {tuple(pixels.shape)}")
    mode = "bilinear" if spatial_dims == 2 else "trilinear"
    size = [size] * spatial_dims if isinstance(size, int) else size
    if size is not None and len(size) != spatial_dims:
        raise ValueError(f"size {list(size)} must have {spatial_dims} entries for an image of shape {tuple(pixels.shape)}")

    if target_spacing is not None:
        if spacing is None or len(spacing) != spatial_dims:
            raise ValueError(f"resampling to target_spacing needs the {spatial_dims} voxel spacings, got {spacing}")
        target = [target_spacing] * spatial_dims if isinstance(target_spacing, (int, float)) else target_spacing
        shape = [max(1, round(n * s / t)) for n, s, t in zip(pixels.shape[1:], spacing, target)]
        pixels = F.interpolate(pixels[None], size=shape, mode=mode, align_corners=False)[0]
        return crop_or_pad(pixels, size) if size is not None else pixels
    if size is not None:
        pixels = F.interpolate(pixels[None], size=list(size), mode=mode, align_corners=False)[0]
    return pixels


def load_scan(
    path: str | os.PathLike,
    window: str | tuple[float, float] | None = "auto",
    target_spacing: float | Sequence[float] | None = None,
    size: int | Sequence[int] | None = None,
    series_uid: str | None = None,
) -> Tensor:
    """Load a DICOM file, DICOM series directory or NIfTI file as a model-ready ``(1, *spatial)`` tensor in ``[0, 1]``.

    Args:
        window: ``(center, width)`` in the file's units (HU for CT); a name from :data:`CT_WINDOWS`;
            ``"auto"`` for the window stored in a DICOM file, else min-max; ``None`` for min-max.
        target_spacing, size: see :func:`resample`.
        series_uid: for a DICOM directory holding several series, the SeriesInstanceUID to read.
    """
    path = Path(path)
    scan = read_nifti(path) if path.name.endswith(NIFTI_SUFFIXES) else read_dicom(path, series_uid)

    if isinstance(window, str) and window != "auto":
        if window not in CT_WINDOWS:
            raise ValueError(f"unknown window {window!r}; use (center, width), 'auto', None or one of {list(CT_WINDOWS)}")
        window = CT_WINDOWS[window]
    if window == "auto":
        window = scan.window
    pixels = rescale_intensity(scan.pixels) if window is None else window_intensity(scan.pixels, *window)
    return resample(pixels, scan.spacing, target_spacing, size)


__all__ = [
    "CT_WINDOWS",
    "Scan",
    "crop_or_pad",
    "load_scan",
    "read_dicom",
    "read_nifti",
    "resample",
    "rescale_intensity",
    "window_intensity",
]
