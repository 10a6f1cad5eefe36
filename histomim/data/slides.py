"""Open whole-slide images and plain images behind one small `Slide` interface.

Backends:

* ``tiffslide`` (default): pure Python, reads SVS/TIFF/NDPI/SCN pyramids.
* ``openslide``: the C library, for formats tiffslide cannot read (e.g. MIRAX ``.mrxs``).
* ``pil``: plain PNG/JPEG (and TIFFs neither slide reader takes) as a single-level "slide".

Every read returns RGB ``uint8`` arrays; transparent or out-of-slide pixels are white, like
the glass background, so that tissue detection and tiles look the same whatever the backend.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".png", ".jpg", ".jpeg")
PLAIN_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
BACKENDS = ("auto", "tiffslide", "openslide", "pil")

# Level-choice slack: a 0.5 um/px target on a 0.499 um/px scan is a 1.002x downsample; a level
# whose downsample is within this relative margin of the request still counts as "not coarser".
_DOWNSAMPLE_TOLERANCE = 1e-2
# Thumbnails are read in strips of at most this many level pixels (24 MB of RGB): a single-level
# 20000x20000 scan is never held whole (1.2 GB per copy) just to be shrunk.
_THUMBNAIL_STRIP_PIXELS = 2**23


class SlideError(ValueError):
    """A file that cannot be read as a slide, or lacks what the caller needs from it."""


class MissingMPPError(SlideError):
    """The slide has no microns-per-pixel metadata and no override was given."""


class Slide:
    """A read-only slide: pyramid geometry, physical resolution and RGB region reads.

    Use `open_slide` to make one. Coordinates follow OpenSlide: ``location`` is ``(x, y)`` in
    level-0 pixels, ``size`` is ``(width, height)`` in pixels of the requested level.
    """

    def __init__(self, path: Path, reader: Any, backend: str, mpp: float | None, objective_power: float | None):
        self.path = path
        self.backend = backend
        self.mpp = mpp
        self.objective_power = objective_power
        self._reader = reader
        self._closed = False

    # -- geometry -------------------------------------------------------------------------

    @property
    def slide_id(self) -> str:
        return self.path.stem

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 ``(width, height)``."""
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple((int(w), int(h)) for w, h in self._reader.level_dimensions)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(float(d) for d in self._reader.level_downsamples)

    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed ``downsample`` (level 0 if none)."""
        if downsample <= 0:
            raise ValueError(f"downsample must be positive, got {downsample}")
        fitting = [i for i, d in enumerate(self.level_downsamples) if d <= downsample * (1 + _DOWNSAMPLE_TOLERANCE)]
        return max(fitting, key=lambda i: self.level_downsamples[i]) if fitting else 0

    def require_mpp(self) -> float:
        """The level-0 um/px, or a `MissingMPPError` that says how to supply it."""
        if self.mpp is None:
            raise MissingMPPError(
                f"{self.path}: no microns-per-pixel (mpp) in the slide metadata; pass mpp_override=... "
                f"(--mpp-override on the command line) with the scan resolution in um/px"
            )
        return self.mpp

    # -- pixels ---------------------------------------------------------------------------

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Read ``size`` pixels at ``level`` starting at level-0 ``location``; (H, W, 3) uint8 RGB.

        Parts outside the slide come back white instead of each backend's own padding.
        """
        if self._closed:
            raise SlideError(f"{self.path}: read from a closed slide")
        if not 0 <= level < self.level_count:
            raise ValueError(f"{self.path}: level {level} out of range (slide has {self.level_count} levels)")
        width, height = int(size[0]), int(size[1])
        if width <= 0 or height <= 0:
            raise ValueError(f"{self.path}: region size must be positive, got {size}")
        downsample = self.level_downsamples[level]
        level_w, level_h = self.level_dimensions[level]

        # 1. the requested box in this level's pixels, clipped to the level
        x0, y0 = math.floor(location[0] / downsample), math.floor(location[1] / downsample)
        left, top = max(x0, 0), max(y0, 0)
        right, bottom = min(x0 + width, level_w), min(y0 + height, level_h)
        region = np.full((height, width, 3), 255, dtype=np.uint8)  # (H, W, 3) white glass
        if right <= left or bottom <= top:
            return region

        # 2. read only the inside part (its level-0 origin) and paste it into the white canvas
        origin0 = (round(left * downsample), round(top * downsample))
        inside = self._reader.read_region(origin0, level, (right - left, bottom - top))
        region[top - y0 : bottom - y0, left - x0 : right - x0] = to_rgb_array(inside)
        return region

    def read_tile(self, location: tuple[int, int], level: int, read_size: int, tile_size: int) -> Image.Image:
        """Read a ``read_size`` square at ``level`` and resize it to ``tile_size`` (RGB PIL image)."""
        tile = Image.fromarray(self.read_region(location, level, (read_size, read_size)))
        if read_size != tile_size:
            tile = tile.resize((tile_size, tile_size), Image.Resampling.LANCZOS)
        return tile

    def thumbnail(self, max_size: int) -> np.ndarray:
        """The whole slide shrunk to fit ``max_size`` px on its longer side; (h, w, 3) uint8 RGB.

        The level is read in strips, each box-filtered to its rows of the thumbnail, so memory stays at
        one strip (`_THUMBNAIL_STRIP_PIXELS`) even on slides without a pyramid.
        """
        width, height = self.dimensions
        scale = min(1.0, max_size / max(width, height))
        thumb_w, thumb_h = max(1, round(width * scale)), max(1, round(height * scale))
        # 1. read the coarsest level that is still at least as large as the thumbnail
        level = self.best_level_for_downsample(1 / scale)
        level_w, level_h = self.level_dimensions[level]
        level_downsample = self.level_downsamples[level]
        rows_per_thumb_row = level_h / thumb_h
        thumb_rows_per_strip = max(1, math.floor(_THUMBNAIL_STRIP_PIXELS / level_w / rows_per_thumb_row))
        # 2. per strip of thumbnail rows: read the level rows under them, box-filter them into place
        strips = []
        for first in range(0, thumb_h, thumb_rows_per_strip):
            last = min(first + thumb_rows_per_strip, thumb_h)
            top, bottom = math.floor(first * rows_per_thumb_row), min(math.ceil(last * rows_per_thumb_row), level_h)
            # ceil: read_region floors location / downsample, which must come back to `top`
            strip = self.read_region((0, math.ceil(top * level_downsample)), level, (level_w, bottom - top))
            # the box keeps the fractional row boundaries of a one-piece resize, so strips join seamlessly
            source_box = (0, first * rows_per_thumb_row - top, level_w, last * rows_per_thumb_row - top)
            strip = Image.fromarray(strip).resize((thumb_w, last - first), Image.Resampling.BOX, box=source_box)
            strips.append(np.asarray(strip))  # (rows, thumb_w, 3)
        return np.concatenate(strips)

    # -- lifetime -------------------------------------------------------------------------

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._reader.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Slide({str(self.path)!r}, backend={self.backend!r}, dimensions={self.dimensions}, "
            f"levels={self.level_count}, mpp={self.mpp})"
        )


def to_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """Any PIL image or array to (H, W, 3) uint8 RGB; alpha is composited on white."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: scale to 8 bits rather than clip
        pixels = np.asarray(image, dtype=np.float64)
        pixels = pixels / max(pixels.max(), 1) * 255
        return np.repeat(pixels.astype(np.uint8)[..., None], 3, axis=2)
    return np.asarray(image.convert("RGB"))


class _PILReader:
    """The slice of the OpenSlide API that `Slide` uses, over one in-memory PIL image."""

    def __init__(self, path: Path):
        with Image.open(path) as image:
            self._image = Image.fromarray(to_rgb_array(image))
        self.level_dimensions = (self._image.size,)
        self.level_downsamples = (1.0,)

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        x, y = location
        return self._image.crop((x, y, x + size[0], y + size[1]))

    def close(self) -> None:
        self._image.close()


def _open_tiffslide(path: Path) -> tuple[Any, float | None, float | None]:
    import tiffslide

    reader = tiffslide.TiffSlide(path)
    props = reader.properties
    return reader, props.get("tiffslide.mpp-x"), props.get("tiffslide.objective-power")


def _open_openslide(path: Path) -> tuple[Any, float | None, float | None]:
    import openslide

    reader = openslide.OpenSlide(str(path))
    props = reader.properties
    return reader, props.get(openslide.PROPERTY_NAME_MPP_X), props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER)


def _open_pil(path: Path) -> tuple[Any, float | None, float | None]:
    # Plain images carry no trustworthy scan resolution (PNG/JPEG DPI is about printing).
    return _PILReader(path), None, None


_OPENERS = {"tiffslide": _open_tiffslide, "openslide": _open_openslide, "pil": _open_pil}


def _backends_to_try(path: Path, backend: str) -> list[str]:
    if backend != "auto":
        return [backend]
    if path.suffix.lower() in PLAIN_IMAGE_EXTENSIONS:
        return ["pil"]
    try:
        import openslide  # noqa: F401  (only a fallback when installed)
    except ImportError:
        return ["tiffslide", "pil"]
    return ["tiffslide", "openslide", "pil"]


def _positive_or_none(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def open_slide(path: str | Path, backend: str = "auto", mpp_override: float | None = None) -> Slide:
    """Open a whole-slide image or a plain image as a `Slide`.

    Args:
        path: slide file (.svs, .tif, .ndpi, .mrxs, .scn, ...) or plain image (.png, .jpg).
        backend: ``"auto"`` tries tiffslide, then OpenSlide (if installed), then PIL; or name one of
            ``"tiffslide"``, ``"openslide"``, ``"pil"``.
        mpp_override: level-0 microns per pixel to use instead of (or in the absence of) metadata.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        SlideError: no backend can read the file (corrupt, truncated or not an image).
    """
    path = Path(path)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not path.is_file():
        raise FileNotFoundError(f"slide file not found: {path}")
    if mpp_override is not None and _positive_or_none(mpp_override) is None:
        raise ValueError(f"mpp_override must be a positive number of um/px, got {mpp_override!r} for {path}")

    failures = []
    for name in _backends_to_try(path, backend):
        try:
            reader, mpp, objective_power = _OPENERS[name](path)
        except ImportError as error:
            failures.append(f"{name}: not installed ({error})")
            continue
        except Exception as error:  # each reader raises its own error types for unreadable files
            failures.append(f"{name}: {type(error).__name__}: {error}")
            continue
        mpp = _positive_or_none(mpp_override) or _positive_or_none(mpp)
        return Slide(path, reader, name, mpp, _positive_or_none(objective_power))
    raise SlideError(f"cannot open {path} as a slide or image ({'; '.join(failures)})")
