"""Figures of samples and sample paths.

``trajectories`` (2-D paths), ``trajectories_1d`` (x(t) against t, e.g. over
``density_over_time``), ``samples_grid`` (2-D point clouds, scatter or histogram, one panel per
label) and ``histograms`` (1-D marginals, optionally with a reference density).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import numpy as np
from jaxtyping import ArrayLike, Float
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure

from fmjax import _checks
from fmjax.plot._style import (
    _finish,
    _label_xy,
    _ncols,
    _panels,
    _single,
    _subsample,
    _time_label,
    styled,
)

__all__ = ["trajectories", "trajectories_1d", "samples_grid", "histograms"]


@styled
def trajectories(
    traj: Float[ArrayLike, "T N 2"],
    *,
    ax: Axes | None = None,
    max_paths: int = 200,
    title: str = "Trajectories",
    lim: tuple[float, float] | None = None,
    path: str | os.PathLike | None = None,
) -> Figure:
    """2-D sample paths with start (circle) and end (cross) markers.

    Args:
        traj: (T, N, 2) positions along time (T >= 2 saved times, N paths).
        ax: axes to draw into, or None for a new figure.
        max_paths: at most this many paths are drawn (evenly spaced subset).
        title: axes title.
        lim: (lo, hi) window for both axes, or None for automatic.
        path: PNG path to write, or None.

    Returns:
        the Figure.
    """
    fn = "plot.trajectories"
    traj = np.asarray(traj)
    if traj.ndim != 3 or traj.shape[-1] != 2 or traj.shape[0] < 2:
        _checks.fail(fn, "traj", "an array of shape (T >= 2, N, 2)", f"shape {traj.shape}")
    max_paths = _checks.check_int(fn, "max_paths", max_paths)
    traj = traj[:, _subsample(traj.shape[1], max_paths)]
    fig, ax = _single(fn, ax, (4.2, 4.0))
    segs = np.swapaxes(traj, 0, 1)  # (N, T, 2)
    ax.add_collection(LineCollection(segs, colors="0.35", linewidths=0.6, alpha=0.5))
    ax.scatter(traj[0, :, 0], traj[0, :, 1], s=9, c="tab:blue", label="start", zorder=3)
    ax.scatter(
        traj[-1, :, 0],
        traj[-1, :, 1],
        s=14,
        c="tab:red",
        marker="x",
        linewidths=0.9,
        label="end",
        zorder=3,
    )
    ax.autoscale_view()
    if lim is not None:
        ax.set_xlim(lim)
        ax.set_ylim(lim)
    ax.set_aspect("equal", adjustable="datalim" if lim is None else "box")
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
    ax.set_title(title)
    ax.legend(loc="best", framealpha=0.8)
    return _finish(fig, path)


@styled
def trajectories_1d(
    ts: Float[ArrayLike, " T"],
    traj: Float[ArrayLike, "T N"],
    *,
    ax: Axes | None = None,
    max_paths: int = 100,
    title: str = "Trajectories",
    color: str = "white",
    path: str | os.PathLike | None = None,
) -> Figure:
    """1-D sample paths x(t) against t, with start and end markers.

    Args:
        ts: (T,) times.
        traj: (T, N) positions (or (T, N, 1)).
        ax: axes to draw into (e.g. ``density_over_time(...).axes[0]``), or None.
        max_paths: at most this many paths are drawn.
        title: axes title (kept if drawing into an existing axes with a title).
        color: path colour ("white" reads well over ``density_over_time``; "black" on white
            when ``ax`` is None, used automatically).
        path: PNG path to write, or None.

    Returns:
        the Figure.
    """
    fn = "plot.trajectories_1d"
    ts = np.asarray(ts, dtype=float)
    traj = np.asarray(traj)
    if traj.ndim == 3 and traj.shape[-1] == 1:
        traj = traj[..., 0]
    if ts.ndim != 1:
        _checks.fail(fn, "ts", "an array of shape (T,)", f"shape {ts.shape}")
    if traj.ndim != 2 or traj.shape[0] != ts.shape[0]:
        _checks.fail(fn, "traj", f"an array of shape (T = {ts.shape[0]}, N)", f"shape {traj.shape}")
    max_paths = _checks.check_int(fn, "max_paths", max_paths)
    new = ax is None
    fig, ax = _single(fn, ax)
    line_color = "black" if new and color == "white" else color
    traj = traj[:, _subsample(traj.shape[1], max_paths)]
    segs = np.stack([np.broadcast_to(ts[:, None], traj.shape), traj], axis=-1)  # (T, N, 2)
    ax.add_collection(
        LineCollection(np.swapaxes(segs, 0, 1), colors=line_color, linewidths=0.6, alpha=0.6)
    )
    ax.scatter(np.full(traj.shape[1], ts[0]), traj[0], s=9, c="tab:blue", zorder=3, label="start")
    ax.scatter(
        np.full(traj.shape[1], ts[-1]),
        traj[-1],
        s=12,
        c="tab:red",
        marker="x",
        linewidths=0.9,
        zorder=3,
        label="end",
    )
    if new:
        ax.autoscale_view()
        ax.set_xlabel("t")
        ax.set_ylabel("x")
        ax.legend(loc="best", framealpha=0.8)
    if new or not ax.get_title():
        ax.set_title(title)
    return _finish(fig, path)


def _sample_lim(arrays, q: float = 0.5):
    allx = np.concatenate([a.reshape(-1) for a in arrays])
    lo, hi = np.percentile(allx, [q, 100 - q])
    pad = 0.05 * (hi - lo + 1e-12)
    return float(lo - pad), float(hi + pad)


@styled
def samples_grid(
    samples_by_t: Mapping[float | str, Float[ArrayLike, "N 2"]],
    *,
    kind: str = "scatter",
    lim: tuple[float, float] | None = None,
    bins: int = 80,
    max_points: int = 5000,
    ncols: int | None = None,
    title: str = "Samples",
    path: str | os.PathLike | None = None,
) -> Figure:
    """Panels of 2-D samples, one per key (e.g. time t -> (N, 2) samples of X_t).

    Args:
        samples_by_t: mapping from a label (a time, or any name) to (N, 2) points.
        kind: "scatter" or "hist2d" (counts, shared colour bar).
        lim: (lo, hi) window for both axes; default from the 0.5/99.5 percentiles of all points.
        bins: histogram bins per axis (hist2d).
        max_points: at most this many points per scatter panel.
        ncols: panels per row.
        title: figure title.
        path: PNG path to write, or None.

    Returns:
        the Figure.
    """
    fn = "plot.samples_grid"
    what = "a non-empty mapping label -> (N, 2) points"
    _checks.check_instance(fn, "samples_by_t", samples_by_t, Mapping, what)
    if not samples_by_t:
        _checks.fail(fn, "samples_by_t", what, samples_by_t)
    kind = _checks.check_choice(fn, "kind", kind, ("scatter", "hist2d"))
    bins = _checks.check_int(fn, "bins", bins)
    max_points = _checks.check_int(fn, "max_points", max_points)
    items = [(lab, np.asarray(x)) for lab, x in samples_by_t.items()]
    for lab, x in items:
        if x.ndim != 2 or x.shape[1] != 2:
            _checks.fail(fn, f"samples_by_t[{lab!r}]", "an array of shape (N, 2)", x.shape)
    lim = lim or _sample_lim([x for _, x in items])
    fig, axes = _panels(len(items), _ncols(fn, ncols), colorbar=kind == "hist2d")
    edges = np.linspace(lim[0], lim[1], bins + 1)
    counts = [np.histogram2d(x[:, 0], x[:, 1], bins=[edges, edges])[0] for _, x in items]
    vmax = max(float(c.max()) for c in counts)
    for ax, (lab, x), cnt in zip(axes, items, counts, strict=True):
        if kind == "scatter":
            sub = x[_subsample(x.shape[0], max_points)]
            ax.scatter(sub[:, 0], sub[:, 1], s=2, alpha=0.5, c="tab:blue", rasterized=True)
        else:
            im = ax.imshow(
                cnt.T,
                origin="lower",
                extent=(*lim, *lim),
                vmin=0,
                vmax=vmax,
                interpolation="nearest",
                cmap="magma",
            )
        ax.set_title(_time_label(lab) if isinstance(lab, float | int) else str(lab))
        _label_xy(ax, lim)
    if kind == "hist2d":
        fig.colorbar(im, ax=axes, label="count", shrink=0.85)
    fig.suptitle(title)
    return _finish(fig, path)


@styled
def histograms(
    samples: Mapping[str, Float[ArrayLike, "N ..."]],
    *,
    reference: Callable | Mapping[str, Callable] | None = None,
    bins: int = 60,
    ncols: int | None = None,
    title: str = "Histograms",
    path: str | os.PathLike | None = None,
) -> Figure:
    """Small multiples of 1-D histograms (density-normalised), optionally with a reference pdf.

    Args:
        samples: mapping name -> (N,) values, or (N, d) for one panel per coordinate
            ("name[i]").
        reference: a density ``x (M,) -> (M,)`` drawn on every panel, or a mapping from panel
            name to such a density (e.g. ``lambda x: np.exp(p.log_prob(x[:, None]))`` for a
            1-D GaussianMixture ``p``), or None.
        bins: bins per histogram.
        ncols: panels per row.
        title: figure title.
        path: PNG path to write, or None.

    Returns:
        the Figure.
    """
    fn = "plot.histograms"
    _checks.check_instance(fn, "samples", samples, Mapping, "a mapping name -> (N,) or (N, d)")
    bins = _checks.check_int(fn, "bins", bins)
    panels = []
    for name, x in samples.items():
        x = np.asarray(x, dtype=float)
        if x.ndim == 1:
            panels.append((str(name), x))
        elif x.ndim == 2:
            panels += [(f"{name}[{i}]", x[:, i]) for i in range(x.shape[1])]
        else:
            _checks.fail(fn, f"samples[{name!r}]", "an array of shape (N,) or (N, d)", x.shape)
    if not panels:
        _checks.fail(fn, "samples", "a non-empty mapping", samples)
    fig, axes = _panels(len(panels), _ncols(fn, ncols), square=False)
    for ax, (name, x) in zip(axes, panels, strict=True):
        ax.hist(x, bins=bins, density=True, color="tab:blue", alpha=0.6, label="samples")
        ref = reference.get(name) if isinstance(reference, Mapping) else reference
        if ref is not None:
            lo, hi = ax.get_xlim()
            grid = np.linspace(lo, hi, 400)
            ax.plot(grid, np.asarray(ref(grid)), color="black", linewidth=1.2, label="reference")
            ax.legend(loc="best", framealpha=0.8)
        ax.set_title(name)
        ax.set_xlabel("x")
        ax.set_ylabel("density")
    fig.suptitle(title)
    return _finish(fig, path)
