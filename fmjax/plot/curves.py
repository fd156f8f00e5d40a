"""Curves over a shared axis: error curves (e.g. velocity error over t) and the training loss."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import numpy as np
from jaxtyping import ArrayLike, Float
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from fmjax import _checks
from fmjax.plot._style import _finish, _single, styled

__all__ = ["error_curve", "training_loss"]


@styled
def error_curve(
    ts: Float[ArrayLike, " T"],
    errors: Mapping[str, Float[ArrayLike, " T"]],
    *,
    ax: Axes | None = None,
    ylabel: str = "error",
    xlabel: str = "t",
    title: str = "Error over time",
    logy: bool = True,
    path: str | os.PathLike | None = None,
) -> Figure:
    """Error curves over a shared x-axis (e.g. velocity MSE over t), log-scale y by default.

    Args:
        ts: (T,) x values.
        errors: mapping name -> (T,) values, one line each.
        ax: axes to draw into, or None.
        ylabel, xlabel, title: labels.
        logy: logarithmic y-axis (non-positive values are dropped from the plot by matplotlib).
        path: PNG path to write, or None.

    Returns:
        the Figure.
    """
    fn = "plot.error_curve"
    ts = np.asarray(ts, dtype=float)
    if ts.ndim != 1:
        _checks.fail(fn, "ts", "an array of shape (T,)", f"shape {ts.shape}")
    _checks.check_instance(fn, "errors", errors, Mapping, "a mapping name -> (T,) values")
    if not errors:
        _checks.fail(fn, "errors", "a non-empty mapping", errors)
    fig, ax = _single(fn, ax)
    for name, e in errors.items():
        e = np.asarray(e, dtype=float)
        if e.shape != ts.shape:
            _checks.fail(fn, f"errors[{name!r}]", f"an array of shape {ts.shape}", e.shape)
        ax.plot(ts, e, marker="o", markersize=3, linewidth=1.3, label=str(name))
    if logy:
        ax.set_yscale("log")
    ax.grid(True, which="major", alpha=0.3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc="best", framealpha=0.8)
    return _finish(fig, path)


@styled
def training_loss(
    losses: Float[ArrayLike, " steps"],
    *,
    floor: float | None = None,
    path: str | os.PathLike | None = None,
    ax: Axes | None = None,
) -> Figure:
    """Training loss per step with its moving mean, and the loss floor as a dashed line.

    The y-range runs from just below the lowest of the moving mean and the floor to the 99th
    percentile of the raw losses (early transients are cut off).

    Args:
        losses: (steps,) loss per step, e.g. ``fit(...).losses``.
        floor: the minimum attainable loss (e.g. ``losses.loss_floor(...).mean``), drawn as a
            dashed line, or None for none.
        path: PNG path to write, or None.
        ax: axes to draw into, or None for a new figure.

    Returns:
        the Figure.
    """
    fn = "plot.training_loss"
    hist = np.asarray(losses, dtype=float)
    if hist.ndim != 1 or hist.size == 0:
        _checks.fail(fn, "losses", "a non-empty array of shape (steps,)", f"shape {hist.shape}")
    if floor is not None:
        floor = _checks.as_float(fn, "floor", floor)
        if not math.isfinite(floor):
            _checks.fail(fn, "floor", "None or a finite number", floor)
    window = max(1, hist.size // 50)
    smooth = np.convolve(hist, np.ones(window) / window, mode="valid")
    fig, ax = _single(fn, ax, (5.0, 3.4))
    steps = np.arange(hist.size)
    ax.plot(steps, hist, color="tab:blue", alpha=0.25, lw=0.6, label="loss per step")
    ax.plot(steps[window - 1 :], smooth, color="tab:blue", lw=1.5, label=f"moving mean ({window})")
    if floor is not None:
        ax.axhline(floor, color="black", ls="--", lw=1.0, label="loss floor (exact)")
    hi = float(np.nanpercentile(hist, 99))
    lo = float(np.nanmin(smooth)) if floor is None else min(float(np.nanmin(smooth)), floor)
    if math.isfinite(lo) and math.isfinite(hi) and hi > lo:
        ax.set_ylim(lo - 0.05 * (hi - lo), hi)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Training loss")
    ax.legend(loc="upper right")
    return _finish(fig, path)
