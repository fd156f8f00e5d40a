"""The one look of fmjax figures, applied once, and the small layout helpers figures share.

``styled`` is the one decorator that applies the rc style to every public figure function (and
to any figure-building function of the caller's); nested styled calls reuse the active style
rather than entering it again. ``figure`` and ``save`` make and write figures in that style for
callers composing their own panels. No pyplot state: figures are built directly.
"""

from __future__ import annotations

import contextvars
import functools
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import numpy as np

from fmjax import _checks

mpl = _checks.require("matplotlib", "fmjax.plot")

from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

__all__ = ["figure", "save", "styled"]

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
_PANEL = 3.0  # inches per panel side in the figure functions' panel grids

_ACTIVE = contextvars.ContextVar("fmjax_plot_style_active", default=False)

P = ParamSpec("P")
R = TypeVar("R")


def styled(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorate a figure-building function so that it runs in the fmjax plot style.

    The style (font sizes, no top/right spines, ``savefig`` dpi and tight bounding box) is one
    ``matplotlib.rc_context``, entered once by the outermost styled call: a styled function that
    calls other styled functions (``figure``, ``trajectories(ax=...)``, ``save``) draws them all
    in the one context. Every public figure function of ``fmjax.plot`` is decorated with it.

    Args:
        fn: a function that builds a figure.

    Returns:
        the decorated function, same signature.
    """

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        if _ACTIVE.get():
            return fn(*args, **kwargs)
        token = _ACTIVE.set(True)
        try:
            with mpl.rc_context(_RC):
                return fn(*args, **kwargs)
        finally:
            _ACTIVE.reset(token)

    wrapper.__fmjax_styled__ = True
    return wrapper


@styled
def figure(
    nrows: int = 1, ncols: int = 1, size: float = 3.2, *, extra_width: float = 0.0
) -> tuple[Figure, np.ndarray]:
    """A new figure with an (nrows, ncols) grid of axes in the fmjax style (constrained layout).

    Args:
        nrows, ncols: grid shape.
        size: inches per panel side.
        extra_width: inches added to the width (e.g. for a colour bar).

    Returns:
        ``(fig, axes)`` with ``axes`` an (nrows, ncols) object array of ``Axes``.
    """
    fn = "plot.figure"
    nrows, ncols = _checks.check_int(fn, "nrows", nrows), _checks.check_int(fn, "ncols", ncols)
    size = _checks.check_positive(fn, "size", size)
    extra_width = _checks.check_positive(fn, "extra_width", extra_width, allow_zero=True)
    fig = Figure(figsize=(size * ncols + extra_width, size * nrows), layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False)


@styled
def save(fig: Figure, path: str | os.PathLike) -> Path:
    """Write ``fig`` as an image (PNG for a ``.png`` path) in the fmjax style; returns the path.

    Args:
        fig: the figure.
        path: where to write it (the format from the suffix).

    Returns:
        the path written, a ``Path``.
    """
    _checks.check_instance("plot.save", "fig", fig, Figure, "a matplotlib Figure")
    fig.savefig(path)
    return Path(path)


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


def _single(fn: str, ax: Any, size=(4.5, 3.2)) -> tuple[Figure, Axes]:
    if ax is None:
        fig = Figure(figsize=size, layout="constrained")
        return fig, fig.add_subplot()
    _checks.check_instance(fn, "ax", ax, Axes, "None or a matplotlib Axes")
    return ax.figure, ax


def _finish(fig: Figure, path) -> Figure:
    if path is not None:
        fig.savefig(path)
    return fig


def _ncols(fn: str, ncols) -> int | None:
    return None if ncols is None else _checks.check_int(fn, "ncols", ncols)


def _label_xy(ax, lim):
    ax.set_xlim(lim)
    ax.set_ylim(lim)
    ax.set_aspect("equal")
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")


def _time_label(t: float) -> str:
    """``t = 0.50``; more digits where two would round (``t = 0.999``, not ``t = 1.00``)."""
    t = float(t)
    return f"t = {t:.2f}" if abs(t - round(t, 2)) < 1e-9 else f"t = {t:.4g}"


def _subsample(n: int, max_paths: int) -> np.ndarray:
    return np.arange(n) if n <= max_paths else np.linspace(0, n - 1, max_paths).astype(int)
