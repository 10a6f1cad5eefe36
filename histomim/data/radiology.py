"""Radiology scans as tensors: DICOM and NIfTI readers, intensity windowing, resampling.

A scan becomes a float tensor ``(C, H, W)`` (slice) or ``(C, D, H, W)`` (volume) in ``[0, 1]``:

1. read the voxels in physical units (:func:`read_dicom` applies RescaleSlope/Intercept, so CT is in
   Hounsfield units; :func:`read_nifti` reorients to RAS) together with the voxel spacing in mm;
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


def _slice_position(dataset) -> float:
    """Position of a slice along its normal, for sorting a series (falls back to InstanceNumber)."""
    if "ImagePositionPatient" in dataset and "ImageOrientationPatient" in dataset:
        orientation = np.asarray(dataset.ImageOrientationPatient, dtype=float)
        normal = np.cross(orientation[:3], orientation[3:])
        return float(np.dot(normal, np.asarray(dataset.ImagePositionPatient, dtype=float)))
    return float(dataset.get("InstanceNumber", 0))


def read_dicom(path: str | os.PathLike) -> Scan:
    """Read a DICOM file (a slice, ``(1, H, W)``) or a directory holding one series (``(1, D, H, W)``).

    Slices of a series are sorted by their position along the slice normal; the depth spacing is the
    median distance between neighbouring slices (``SliceThickness`` for a single slice).

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: a file is not DICOM, has no or undecodable pixel data, or the slices of a series
            differ in size (the message names the file).
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise FileNotFoundError(f"DICOM series directory {path} holds no files")
        datasets = sorted(((_read_dicom_dataset(f), f) for f in files), key=lambda pair: _slice_position(pair[0]))
    else:
        datasets = [(_read_dicom_dataset(path), path)]

    slices = [_dicom_pixels(dataset, file) for dataset, file in datasets]
    first, first_file = datasets[0]
    for (_, file), pixels in zip(datasets, slices):
        if pixels.shape != slices[0].shape:
            raise ValueError(f"DICOM file {file} has shape {pixels.shape}, but {first_file} has {slices[0].shape}")
    row_spacing, column_spacing = (float(v) for v in first.get("PixelSpacing", (1.0, 1.0)))

    if len(slices) == 1 and slices[0].ndim == 2:
        return Scan(torch.from_numpy(slices[0])[None], (row_spacing, column_spacing), _dicom_window(first))

    volume = np.concatenate(slices) if slices[0].ndim == 3 else np.stack(slices)  # (D, H, W)
    positions = [_slice_position(dataset) for dataset, _ in datasets]
    gaps = np.abs(np.diff(positions))
    depth_spacing = float(np.median(gaps)) if len(gaps) and np.median(gaps) > 0 else float(first.get("SliceThickness", 1.0))
    return Scan(torch.from_numpy(volume)[None], (depth_spacing, row_spacing, column_spacing), _dicom_window(first))


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
        image = nib.as_closest_canonical(nib.load(path))
        data = np.asarray(image.get_fdata(dtype=np.float32))  # (X, Y, Z) or (X, Y, Z, C)
    except Exception as error:  # nibabel raises ImageFileError, EOFError, zlib errors, ... for broken files
        raise ValueError(f"{path} is not a readable NIfTI file: {error}") from error
    if data.ndim not in (3, 4):
        raise ValueError(f"NIfTI file {path} has {data.ndim} dimensions, expected a 3-D volume (or 4-D with channels)")
    volume = torch.from_numpy(np.ascontiguousarray(data))
    volume = volume.permute(2, 1, 0)[None] if volume.ndim == 3 else volume.permute(3, 2, 1, 0)  # (C, Z, Y, X)
    zooms = [float(z) for z in image.header.get_zooms()[:3]]
    return Scan(volume, tuple(reversed(zooms)))


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
) -> Tensor:
    """Load a DICOM file, DICOM series directory or NIfTI file as a model-ready ``(1, *spatial)`` tensor in ``[0, 1]``.

    Args:
        window: ``(center, width)`` in the file's units (HU for CT); a name from :data:`CT_WINDOWS`;
            ``"auto"`` for the window stored in a DICOM file, else min-max; ``None`` for min-max.
        target_spacing, size: see :func:`resample`.
    """
    path = Path(path)
    scan = read_nifti(path) if path.name.endswith(NIFTI_SUFFIXES) else read_dicom(path)

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
