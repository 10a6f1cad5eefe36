"""The model presets of ``hub_configs/`` (one ``config.json`` + ``preprocessor_config.json`` folder each).

They ship inside the package as ``histomim.hub_configs`` (the repository's top-level folder, mapped by
pyproject.toml), so an installed wheel has them as an editable checkout does.
"""

from __future__ import annotations

from pathlib import Path

from .resources import resource_dir


def presets_dir() -> Path:
    """The folder of the shipped presets."""
    return resource_dir("hub_configs")


def preset_names() -> list[str]:
    """The presets shipped in ``hub_configs/``."""
    folder = presets_dir()
    return sorted(p.name for p in folder.iterdir() if (p / "config.json").is_file()) if folder.is_dir() else []


def config_source(name: str) -> str:
    """A preset name -> its folder; an existing folder or a Hub id is returned as given (a path wins)."""
    preset = presets_dir() / name
    return name if Path(name).exists() or not (preset / "config.json").is_file() else str(preset)


__all__ = ["presets_dir", "preset_names", "config_source"]
