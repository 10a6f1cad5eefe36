"""matplotlib for PNG output, the one way histomim draws: the non-interactive Agg backend, imported on
first use (importing histomim stays light, plotting works on headless machines), figures written
atomically (a killed run never leaves half a PNG)."""

from __future__ import annotations

from pathlib import Path

from .atomic import atomic_path


def pyplot():
    """`matplotlib.pyplot` on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(figure, path: str | Path, dpi: int = 100) -> Path:
    """Write `figure` to `path` as PNG, atomically, and close it."""
    path = Path(path)
    with atomic_path(path) as partial:
        figure.savefig(partial, dpi=dpi, format="png")
    pyplot().close(figure)
    return path


__all__ = ["pyplot", "save_png"]
