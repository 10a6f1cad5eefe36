"""matplotlib for PNG output, the one way histomim draws: figures on their own Agg canvas, imported on
first use (importing histomim stays light, plotting works on headless machines), written atomically
(a killed run never leaves half a PNG).

``matplotlib.figure.Figure`` + ``FigureCanvasAgg``, never ``matplotlib.use`` or pyplot's figure manager:
drawing a plot must not switch the backend of the user's notebook or GUI session, and figures that
pyplot does not track cannot leak or be drawn into by other code; drawing is safe in worker threads.
"""

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


def subplots(nrows: int = 1, ncols: int = 1, **kwargs):
    """``(figure, axes)`` like ``pyplot.subplots`` (same arguments), on a `new_figure`."""
    figure = new_figure(**{k: kwargs.pop(k) for k in ("figsize", "dpi", "layout") if k in kwargs})
    return figure, figure.subplots(nrows, ncols, **kwargs)


def save_png(figure, path: str | Path, dpi: int = 100) -> Path:
    """Write `figure` to `path` as PNG, atomically."""
    path = Path(path)
    with atomic_path(path) as partial:
        figure.savefig(partial, dpi=dpi, format="png")
    return path


__all__ = ["new_figure", "subplots", "save_png"]
