"""The data folders that ship inside the package: ``hub_configs/`` (presets) and ``model_cards/``.

In the repository they sit at the top level; pyproject.toml maps them into the wheel as
``histomim.hub_configs`` and ``histomim.model_cards`` (data-only namespace packages, located with
importlib). Run from a source checkout (the repository on ``sys.path`` shadows an install), they are
found next to the package.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SHIPPED_FOLDERS = ("hub_configs", "model_cards")


def resource_dir(name: str) -> Path:
    """The folder ``name`` (one of `SHIPPED_FOLDERS`) as a real path."""
    if name not in SHIPPED_FOLDERS:
        raise ValueError(f"unknown resource folder {name!r}; expected one of {SHIPPED_FOLDERS}")
    try:
        spec = importlib.util.find_spec(f"histomim.{name}")
    except ModuleNotFoundError:
        spec = None
    if spec is None or not spec.submodule_search_locations:  # a source checkout imported from the repository root
        return Path(__file__).resolve().parents[1] / name
    return Path(next(iter(spec.submodule_search_locations)))


__all__ = ["resource_dir", "SHIPPED_FOLDERS"]
