"""matplotlib for PNG output, the one way histomim draws: a `matplotlib.figure.Figure` on an Agg canvas,
imported on first use (importing histomim stays light, plotting works on headless machines). No pyplot:
a user's backend and pyplot's global figure list are left alone, and drawing is safe in worker threads.
Figures are written atomically (a killed run never leaves half a PNG)."""

from __future__ import annotations

from pathlib import Path

from .atomic import atomic_path


def new_figure(**figure_kwargs):
    """A `matplotlib.figure.Figure` (``figsize=...``) with its own Agg canvas; draw with ``figure.subplots``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(**figure_kwargs)
    FigureCanvasAgg(figure)
    return figure


def save_png(figure, path: str | Path, dpi: int = 100) -> Path:
    """Write `figure` to `path` as PNG, atomically."""
    path = Path(path)
    with atomic_path(path) as partial:
        figure.savefig(partial, dpi=dpi, format="png")
    return path


__all__ = ["new_figure", "save_png"]
