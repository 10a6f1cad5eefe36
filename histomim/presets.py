"""The model presets in ``hub_configs/`` (one ``config.json`` + ``preprocessor_config.json`` folder each)."""

from __future__ import annotations

from pathlib import Path

PRESETS_DIR = Path(__file__).resolve().parents[1] / "hub_configs"


def preset_names() -> list[str]:
    """The presets shipped in ``hub_configs/``."""
    return sorted(p.name for p in PRESETS_DIR.iterdir() if p.is_dir()) if PRESETS_DIR.is_dir() else []


def config_source(name: str) -> str:
    """A preset name -> its folder; an existing folder or a Hub id is returned as given (a path wins)."""
    preset = PRESETS_DIR / name
    return name if Path(name).exists() or not preset.is_dir() else str(preset)


__all__ = ["PRESETS_DIR", "preset_names", "config_source"]
