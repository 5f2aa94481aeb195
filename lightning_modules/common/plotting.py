"""Matplotlib figures for TensorBoard and PNG files: one place for the backend, sizes and colour bars.

Every figure drawn in this project comes from `new_figure` (at least 640x480 at the default DPI): a bare
`Figure` with its own Agg canvas, outside pyplot's global registry, so figures made at every validation are
freed with their last reference and never accumulate. It leaves through `log_figures` (TensorBoard's
`add_figure`) or `save_png`; both also close a pyplot figure handed to them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: runs on servers and in DDP workers

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

MIN_SIZE_IN = (6.4, 4.8)  # inches; 640x480 pixels at matplotlib's default 100 DPI
MAX_TICK_LABELS = 40  # beyond this many rows/columns a heatmap labels every n-th one


def new_figure(
    nrows: int = 1, ncols: int = 1, size: tuple[float, float] | None = None, **kwargs: Any
) -> tuple[Figure, Any]:
    """(figure, axes) of at least 6.4 x 4.8 inches, constrained layout (colour bars and long labels fit);
    axes as plt.subplots returns them (one Axes, or an array)."""
    w, h = size or MIN_SIZE_IN
    # a bare Figure, not pyplot's: nothing global to leak or to lock when figures are made every validation
    fig = Figure(figsize=(max(w, MIN_SIZE_IN[0]), max(h, MIN_SIZE_IN[1])), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, **kwargs)
    return fig, axes


def tick_labels(ax: Axes, axis: str, labels: Sequence[str], max_labels: int = MAX_TICK_LABELS) -> None:
    """Label every cell of `axis` ('x' or 'y') of an image plot, or every n-th one when there are many."""
    n = len(labels)
    step = max(1, int(np.ceil(n / max_labels)))
    positions = list(range(0, n, step))
    shown = [labels[i] for i in positions]
    if axis == "x":
        ax.set_xticks(positions, shown, rotation=90 if max(map(len, shown), default=0) > 3 else 0)
    else:
        ax.set_yticks(positions, shown)


def heatmap(
    ax: Axes,
    values: Any,
    *,
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str = "viridis",
    xlabels: Sequence[str] | None = None,
    ylabels: Sequence[str] | None = None,
    colorbar_label: str = "",
) -> Any:
    """Draw a (rows, cols) matrix with a colour bar spanning [vmin, vmax]; returns the colour bar."""
    data = np.asarray(values, dtype=np.float64)
    if data.ndim == 1:
        data = data[None]
    image = ax.imshow(data, vmin=vmin, vmax=vmax, cmap=cmap, aspect="auto", interpolation="nearest")
    if xlabels is not None:
        tick_labels(ax, "x", list(xlabels))
    if ylabels is not None:
        tick_labels(ax, "y", list(ylabels))
    colorbar = ax.figure.colorbar(image, ax=ax)
    colorbar.set_label(colorbar_label)
    return colorbar


def spans_decades(values: Iterable[float], decades: float = 2.0) -> bool:
    """True when the positive values span more than `decades` powers of ten (use a log axis)."""
    positive = [float(v) for v in values if v is not None and float(v) > 0 and np.isfinite(float(v))]
    return len(positive) > 1 and max(positive) / min(positive) > 10**decades


def save_png(fig: Figure, path: str | Path, close: bool = True) -> Path:
    """Write the figure as a PNG (parents created); closes it unless close=False."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    if close:
        plt.close(fig)
    return path


def close_all(figures: Mapping[str, Figure]) -> None:
    """Close the figures pyplot holds (a no-op for `new_figure`'s)."""
    for fig in figures.values():
        plt.close(fig)


def log_figures(
    loggers: Iterable[Any], figures: Mapping[str, Figure], step: int, prefix: str = "figures/"
) -> int:
    """Log each figure to every TensorBoard logger (`add_figure`) under prefix + tag, then close all.

    Loggers without `add_figure` (CSV, W&B without TensorBoard) are skipped; returns how many images went
    to a logger."""
    logged = 0
    writers = [getattr(logger, "experiment", None) for logger in loggers]
    writers = [w for w in writers if hasattr(w, "add_figure")]
    for tag, fig in figures.items():
        for writer in writers:
            writer.add_figure(prefix + tag, fig, global_step=step, close=False)
            logged += 1
    close_all(figures)
    return logged


def save_figures(figures: Mapping[str, Figure], out_dir: str | Path, close: bool = True) -> list[Path]:
    """Write each figure to out_dir/<tag>.png (a tag's '/' makes subdirectories); returns the paths."""
    out = Path(out_dir)
    return [save_png(fig, out / f"{tag}.png", close=close) for tag, fig in figures.items()]
