"""Figures of exact quantities on grids: densities, velocities and responsibilities.

``density_and_velocity`` (log p_t image with u_t arrows or streamlines), ``responsibilities``
(posterior component probabilities) for 2-D problems, and ``density_over_time`` (p_t(x) over
(t, x)) for 1-D problems. Times default to the schedule's valid interval (``schedule.interval``)
and times outside it are refused. The exact engine is evaluated with one jitted call vmapped over
all panel times.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import matplotlib as mpl
import numpy as np
from jaxtyping import ArrayLike, Float
from matplotlib.axes import Axes
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure

from fmjax import _checks, exact
from fmjax.mixtures import JointGaussianMixture
from fmjax.plot._style import (
    _finish,
    _label_xy,
    _ncols,
    _panels,
    _single,
    _time_label,
    styled,
)
from fmjax.schedules import Schedule

__all__ = ["density_and_velocity", "responsibilities", "density_over_time"]

_LOG_RANGE = 12.0  # log-density colour range: [max - 12, max] nats


def _check_problem(fn: str, coupling, schedule, dim: int):
    _checks.check_instance(fn, "coupling", coupling, JointGaussianMixture, "a JointGaussianMixture")
    _checks.check_instance(fn, "schedule", schedule, Schedule, "an fmjax Schedule")
    if coupling.dim != dim:
        _checks.fail(fn, "coupling", f"a {dim}-D problem", f"coupling.dim = {coupling.dim}")


def _times(fn: str, schedule: Schedule, ts, default: int) -> np.ndarray:
    """Times as a (T,) float array; None gives ``default`` times spanning the valid interval."""
    if ts is None:
        return np.linspace(schedule.t_min, schedule.t_max, default)
    ts = np.atleast_1d(np.asarray(ts, dtype=float))
    if ts.ndim != 1 or ts.size == 0:
        _checks.fail(fn, "ts", "a non-empty 1-D sequence of times", f"shape {ts.shape}")
    schedule.check_times(fn, "ts", ts)
    return ts


def _lim(fn: str, lim) -> tuple[float, float] | None:
    if lim is None:
        return None
    try:
        lo, hi = lim
    except (TypeError, ValueError):
        _checks.fail(fn, "lim", "None or a pair (lo, hi)", lim, TypeError)
    lo, hi = _checks.as_float(fn, "lim", lo), _checks.as_float(fn, "lim", hi)
    if not lo < hi:
        _checks.fail(fn, "lim", "a pair (lo, hi) with lo < hi", lim)
    return lo, hi


def _auto_lim(coupling: JointGaussianMixture, schedule: Schedule, ts, n_std: float = 3.0):
    """Square window (lo, hi) holding mean +- n_std std of every component at every time."""
    los, his = [], []
    for t in ts:  # a handful of panel times
        p = exact.marginal(coupling, schedule, float(t))
        sd = np.sqrt(np.diagonal(np.asarray(p.covs), axis1=1, axis2=2))
        m = np.asarray(p.means)
        los.append((m - n_std * sd).min())
        his.append((m + n_std * sd).max())
    return float(min(los)), float(max(his))


def _grid(lim, n: int):
    xs = np.linspace(lim[0], lim[1], n)
    gx, gy = np.meshgrid(xs, xs)
    return xs, np.stack([gx, gy], axis=-1)  # (n,), (n, n, 2) with [i, j] = (xs[j], xs[i])


# Jitted at this edge: eager dispatch of the vmapped exact engine is several times slower.
@functools.partial(jax.jit, static_argnames=("quantity",))
def _on_grid(coupling, schedule, ts, points, quantity: str):
    """exact.<quantity>(c, s, t, points) for each t: vmapped over the (T,) times."""
    fn = getattr(exact, quantity)
    return jax.vmap(lambda t: fn(coupling, schedule, t, points))(ts)


def _eval(coupling, schedule, ts, points, quantity):
    dtype = coupling.means.dtype
    return np.asarray(
        _on_grid(coupling, schedule, jnp.asarray(ts, dtype), jnp.asarray(points, dtype), quantity)
    )


@styled
def density_and_velocity(
    coupling: JointGaussianMixture,
    schedule: Schedule,
    ts: Sequence[float] | None = None,
    *,
    lim: tuple[float, float] | None = None,
    n_grid: int = 120,
    n_arrows: int = 17,
    kind: str = "quiver",
    ncols: int | None = None,
    path: str | os.PathLike | None = None,
) -> Figure:
    """Exact log-density log p_t (image) and velocity u_t (arrows or streamlines), one panel per t.

    Args:
        coupling: 2-D joint mixture of (X0, X1).
        schedule: affine schedule.
        ts: panel times in ``schedule.interval``; default 4 times spanning it.
        lim: (lo, hi) window for both axes; default: every component's mean +- 3 std at every t.
        n_grid: image resolution per axis.
        n_arrows: arrows per axis (quiver) or streamline grid resolution factor.
        kind: "quiver" or "stream".
        ncols: panels per row (default up to 4).
        path: PNG path to write, or None.

    Returns:
        the Figure; all panels share the colour scale [max - 12, max] nats (one colour bar).
        Arrow lengths are proportional to speed, clipped at the 90th percentile of all arrows.
    """
    fn = "plot.density_and_velocity"
    _check_problem(fn, coupling, schedule, 2)
    ts = _times(fn, schedule, ts, 4)
    kind = _checks.check_choice(fn, "kind", kind, ("quiver", "stream"))
    n_grid = _checks.check_int(fn, "n_grid", n_grid, minimum=2)
    n_arrows = _checks.check_int(fn, "n_arrows", n_arrows, minimum=2)
    ncols = _ncols(fn, ncols)
    lim = _lim(fn, lim) or _auto_lim(coupling, schedule, ts)
    _, pts = _grid(lim, n_grid)
    logp = _eval(coupling, schedule, ts, pts, "log_prob")  # (T, G, G)
    n_vel = n_grid if kind == "stream" else n_arrows
    vxs, vpts = _grid(lim, n_vel)
    vel = _eval(coupling, schedule, ts, vpts, "velocity")  # (T, A, A, 2)
    vmax = float(np.nanmax(logp))
    norm = mpl.colors.Normalize(vmax - _LOG_RANGE, vmax)

    if kind == "quiver":
        # Lengths proportional to speed, clipped at the 90th percentile over all panels (far-field
        # speeds grow linearly in |x| and would otherwise shrink every other arrow to a dot).
        speed = np.linalg.norm(vel, axis=-1, keepdims=True)
        cap = max(float(np.percentile(speed, 90)), 1e-12)
        vel = vel * np.minimum(1.0, cap / np.maximum(speed, 1e-30))
        arrow_scale = cap / (0.9 * (vxs[1] - vxs[0]))

    fig, axes = _panels(len(ts), ncols, colorbar=True)
    for ax, t, lp, v in zip(axes, ts, logp, vel, strict=True):
        im = ax.imshow(lp, origin="lower", extent=(*lim, *lim), norm=norm, interpolation="bilinear")
        if kind == "quiver":
            ax.quiver(
                vxs,
                vxs,
                v[..., 0],
                v[..., 1],
                color="white",
                alpha=0.85,
                angles="xy",
                scale_units="xy",
                scale=arrow_scale,
                width=0.005,
            )
        else:
            speed = np.linalg.norm(v, axis=-1)
            ax.streamplot(
                vxs,
                vxs,
                v[..., 0],
                v[..., 1],
                color="white",
                density=0.9,
                linewidth=0.4 + 1.2 * speed / max(float(speed.max()), 1e-12),
                arrowsize=0.7,
            )
        ax.set_title(_time_label(t))
        _label_xy(ax, lim)
    fig.colorbar(im, ax=axes, label=r"$\log p_t(x)$", shrink=0.85)
    fig.suptitle(f"Exact density and velocity ({schedule.name} schedule)")
    return _finish(fig, path)


def _component_colors(k: int) -> np.ndarray:
    cmap = mpl.colormaps["tab10" if k <= 10 else "tab20" if k <= 20 else "turbo"]
    if k <= 20:
        return np.asarray(cmap.colors)[:k, :3]
    return cmap(np.linspace(0, 1, k))[:, :3]


@styled
def responsibilities(
    coupling: JointGaussianMixture,
    schedule: Schedule,
    ts: Sequence[float] | None = None,
    *,
    lim: tuple[float, float] | None = None,
    n_grid: int = 150,
    mode: str = "mix",
    ncols: int | None = None,
    path: str | os.PathLike | None = None,
) -> Figure:
    """Posterior component probabilities P(K = k | X_t = x) on a grid, one panel per t.

    Each component k has a colour; ``mode="mix"`` colours a pixel by the responsibility-weighted
    average colour (soft boundaries blend), ``mode="argmax"`` by the most likely component with
    brightness set by its probability. The component means of p_t are marked with crosses.

    Args:
        coupling: 2-D joint mixture of (X0, X1).
        schedule: affine schedule.
        ts: panel times in ``schedule.interval``; default 4 times spanning it.
        lim: (lo, hi) window for both axes; default as in ``density_and_velocity``.
        n_grid: image resolution per axis.
        mode: "mix" or "argmax".
        ncols: panels per row.
        path: PNG path to write, or None.

    Returns:
        the Figure, with a categorical colour bar of the components.
    """
    fn = "plot.responsibilities"
    _check_problem(fn, coupling, schedule, 2)
    ts = _times(fn, schedule, ts, 4)
    mode = _checks.check_choice(fn, "mode", mode, ("mix", "argmax"))
    n_grid = _checks.check_int(fn, "n_grid", n_grid, minimum=2)
    ncols = _ncols(fn, ncols)
    lim = _lim(fn, lim) or _auto_lim(coupling, schedule, ts)
    _, pts = _grid(lim, n_grid)
    resp = _eval(coupling, schedule, ts, pts, "responsibilities")  # (T, G, G, K)
    k = resp.shape[-1]
    colors = _component_colors(k)

    fig, axes = _panels(len(ts), ncols, colorbar=True)
    for ax, t, r in zip(axes, ts, resp, strict=True):
        if mode == "mix":
            rgb = r @ colors
        else:
            rgb = colors[np.argmax(r, axis=-1)] * np.max(r, axis=-1, keepdims=True)
        ax.imshow(np.clip(rgb, 0, 1), origin="lower", extent=(*lim, *lim), interpolation="nearest")
        means = np.asarray(exact.marginal(coupling, schedule, float(t)).means)
        ax.scatter(
            means[:, 0],
            means[:, 1],
            c="black",
            marker="X",
            s=45,
            edgecolors="white",
            linewidths=0.8,
            zorder=3,
            label="component means",
        )
        ax.set_title(_time_label(t))
        _label_xy(ax, lim)
    sm = mpl.cm.ScalarMappable(
        norm=BoundaryNorm(np.arange(k + 1) - 0.5, k), cmap=ListedColormap(colors)
    )
    ticks = np.arange(k) if k <= 20 else np.linspace(0, k - 1, 6).round().astype(int)
    fig.colorbar(sm, ax=axes, ticks=ticks, label="component k", shrink=0.85)
    fig.suptitle(f"Responsibilities $P(k \\mid X_t = x)$ ({mode}, {schedule.name} schedule)")
    return _finish(fig, path)


@styled
def density_over_time(
    coupling: JointGaussianMixture,
    schedule: Schedule,
    xs: Float[ArrayLike, " M"],
    ts: Float[ArrayLike, " T"] | None = None,
    *,
    log: bool = False,
    ax: Axes | None = None,
    title: str | None = None,
    path: str | os.PathLike | None = None,
) -> Figure:
    """Exact density p_t(x) of a 1-D problem as an image over (t, x).

    Args:
        coupling: 1-D joint mixture of (X0, X1).
        schedule: affine schedule.
        xs: (M,) increasing positions (vertical axis).
        ts: (T,) increasing times in ``schedule.interval`` (horizontal axis); default 160 times
            spanning it (for VP: up to 1 - eps, where the density is still finite).
        log: show log p_t(x) (clipped to [max - 12, max]) instead of p_t(x).
        ax: axes to draw into, or None.
        title: axes title; default names the schedule.
        path: PNG path to write, or None.

    Returns:
        the Figure (with a colour bar).
    """
    fn = "plot.density_over_time"
    _check_problem(fn, coupling, schedule, 1)
    ts = _times(fn, schedule, ts, 160)
    xs = np.asarray(xs, dtype=float)
    if xs.ndim != 1 or xs.size < 2:
        _checks.fail(fn, "xs", "an array of shape (M,) with M >= 2", f"shape {xs.shape}")
    logp = _eval(coupling, schedule, ts, xs[:, None], "log_prob")  # (T, M)
    fig, ax = _single(fn, ax, (5.0, 3.4))
    vmax = float(logp.max())
    img = np.maximum(logp, vmax - _LOG_RANGE) if log else np.exp(logp)
    mesh = ax.pcolormesh(ts, xs, img.T, shading="nearest", rasterized=True)
    fig.colorbar(mesh, ax=ax, label=r"$\log p_t(x)$" if log else r"$p_t(x)$")
    ax.set_xlabel("t")
    ax.set_ylabel("x")
    ax.set_title(title or f"Exact density over time ({schedule.name} schedule)")
    return _finish(fig, path)
