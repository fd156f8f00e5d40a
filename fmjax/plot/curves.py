"""Curves over a shared axis (public in ``fmjax.plot``): ``error_curve``, e.g. the velocity error
of learned fields over t, or an error against step count, one line per named curve.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from matplotlib.figure import Figure

from fmjax._plot_common import _finish, _single, _styled


@_styled
def error_curve(
    ts,
    errors: Mapping[str, object],
    *,
    ax=None,
    ylabel: str = "error",
    xlabel: str = "t",
    title: str = "Error over time",
    logy: bool = True,
    path=None,
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
    ts = np.asarray(ts, dtype=float)
    if ts.ndim != 1 or not errors:
        raise ValueError(
            f"plot.error_curve: need `ts` (T,) and a non-empty `errors`, got "
            f"{ts.shape} and {len(errors)} curves"
        )
    fig, ax = _single(ax)
    for name, e in errors.items():
        e = np.asarray(e, dtype=float)
        if e.shape != ts.shape:
            raise ValueError(
                f"plot.error_curve: `errors[{name!r}]` must have shape {ts.shape}, got {e.shape}"
            )
        ax.plot(ts, e, marker="o", markersize=3, linewidth=1.3, label=str(name))
    if logy:
        ax.set_yscale("log")
    ax.grid(True, which="major", alpha=0.3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc="best", framealpha=0.8)
    return _finish(fig, path)
