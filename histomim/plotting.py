"""matplotlib for PNG output, the one way histomim draws: figures on their own Agg canvas, imported on
first use (importing histomim stays light, plotting works on headless machines), written atomically
(a killed run never leaves half a PNG).

``matplotlib.figure.Figure`` + ``FigureCanvasAgg``, never ``matplotlib.use`` or pyplot's figure manager:
drawing a plot must not switch the backend of the user's notebook or GUI session, and figures that
pyplot does not track cannot leak or be drawn into by other code.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

from .atomic import atomic_path


def subplots(nrows: int = 1, ncols: int = 1, **kwargs):
    """``(figure, axes)`` like ``pyplot.subplots`` (same arguments), on a Figure with its own Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure_kwargs = {k: kwargs.pop(k) for k in ("figsize", "dpi", "layout") if k in kwargs}
    figure = Figure(**figure_kwargs)
    FigureCanvasAgg(figure)
    return figure, figure.subplots(nrows, ncols, **kwargs)


def pyplot():
    """The part of ``matplotlib.pyplot`` histomim's plots use (``subplots``, ``close``), without pyplot:
    figures get their own Agg canvas and the user's matplotlib backend is left alone."""
    return SimpleNamespace(subplots=subplots, close=_close)


def _close(figure) -> None:
    """Release ``figure`` if pyplot tracks it (a caller's pyplot figure); Agg-canvas figures need nothing."""
    plt = sys.modules.get("matplotlib.pyplot")  # never import pyplot just to close
    if plt is not None:
        plt.close(figure)


def save_png(figure, path: str | Path, dpi: int = 100) -> Path:
    """Write `figure` to `path` as PNG, atomically, and close it."""
    path = Path(path)
    with atomic_path(path) as partial:
        figure.savefig(partial, dpi=dpi, format="png")
    _close(figure)
    return path


__all__ = ["pyplot", "save_png", "subplots"]
