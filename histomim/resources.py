"""The data folders that ship inside the package: ``hub_configs/`` (presets) and ``model_cards/``.

In the repository they sit at the top level; pyproject.toml maps them into the wheel as
``histomim.hub_configs`` and ``histomim.model_cards``, read here with importlib.resources. Run from a
source checkout (the repository on ``sys.path`` shadows an install), they are found next to the package.
"""

from __future__ import annotations

from importlib.resources import as_file, files
from pathlib import Path

SHIPPED_FOLDERS = ("hub_configs", "model_cards")


def resource_dir(name: str) -> Path:
    """The folder ``name`` (one of `SHIPPED_FOLDERS`) as a real path."""
    if name not in SHIPPED_FOLDERS:
        raise ValueError(f"unknown resource folder {name!r}; expected one of {SHIPPED_FOLDERS}")
    try:
        resource = files(f"histomim.{name}")
    except ModuleNotFoundError:  # a source checkout imported from the repository root
        return Path(__file__).resolve().parents[1] / name
    with as_file(resource) as folder:  # installed packages are unpacked folders, so this stays valid
        return Path(folder)


__all__ = ["resource_dir", "SHIPPED_FOLDERS"]
