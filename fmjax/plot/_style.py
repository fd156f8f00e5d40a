"""Shared look and layout of the ``fmjax.plot`` figures.

The rc style ``_RC`` (also used by ``fmjax.experiments`` for its own figures), the ``_styled``
decorator that applies it, and small helpers that make panel grids or a single axes, label 2-D
axes, subsample paths or points, and write the PNG. No pyplot state: figures are built directly.
"""

from __future__ import annotations

import functools
import math

import matplotlib as mpl
import numpy as np
from matplotlib.figure import Figure

# One look for all figures: readable labels, light grid, no top/right spines.
_RC = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "figure.titlesize": 11,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "image.cmap": "viridis",
    "savefig.dpi": 120,
    "savefig.bbox": "tight",
}
_PANEL = 3.0  # inches per panel side


def _styled(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with mpl.rc_context(_RC):
            return fn(*args, **kwargs)

    return wrapper


def _panels(n: int, ncols: int | None, colorbar: bool = False, square: bool = True):
    ncols = min(n, ncols or min(n, 4))
    nrows = math.ceil(n / ncols)
    width = _PANEL * ncols + (0.8 if colorbar else 0.0)
    height = _PANEL * nrows if square else 0.75 * _PANEL * nrows
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_axis_off()
    return fig, list(axes[:n])


def _single(ax, size=(4.5, 3.2)):
    if ax is None:
        fig = Figure(figsize=size, layout="constrained")
        return fig, fig.add_subplot()
    return ax.figure, ax


def _finish(fig: Figure, path) -> Figure:
    if path is not None:
        fig.savefig(path)
    return fig


def _label_xy(ax, lim):
    ax.set_xlim(lim)
    ax.set_ylim(lim)
    ax.set_aspect("equal")
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")


def _subsample(n: int, max_paths: int) -> np.ndarray:
    return np.arange(n) if n <= max_paths else np.linspace(0, n - 1, max_paths).astype(int)
