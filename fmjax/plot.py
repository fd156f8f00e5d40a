"""Matplotlib figures: exact densities, velocities, responsibilities, samples, paths, errors.

Every function builds a ``matplotlib.figure.Figure`` directly (no pyplot state: safe under the
Agg backend, in scripts, tests and threads), returns it, and also writes a PNG when ``path`` is
given. Functions that draw one axes accept ``ax=`` to draw into an existing axes instead (then
the returned figure is that axes' figure), so e.g. 1-D trajectories can be drawn over
``density_over_time``. Exact quantities on grids are evaluated with one jitted, vmapped call
over all panel times.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import matplotlib as mpl
import numpy as np
from matplotlib.collections import LineCollection
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure

from fmjax import exact
from fmjax.mixtures import JointGaussianMixture
from fmjax.schedules import Schedule

__all__ = [
    "density_and_velocity",
    "responsibilities",
    "trajectories",
    "trajectories_1d",
    "density_over_time",
    "samples_grid",
    "error_curve",
    "histograms",
]

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
_LOG_RANGE = 12.0  # log-density colour range: [max - 12, max] nats


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


def _check_problem(fn: str, coupling, schedule, dim: int):
    if not isinstance(coupling, JointGaussianMixture):
        raise ValueError(
            f"plot.{fn}: `coupling` must be a JointGaussianMixture, got {type(coupling)}"
        )
    if not isinstance(schedule, Schedule):
        raise ValueError(f"plot.{fn}: `schedule` must be an fmjax Schedule, got {type(schedule)}")
    if coupling.dim != dim:
        raise ValueError(f"plot.{fn}: needs a {dim}-D problem, got `coupling.dim` = {coupling.dim}")


def _times(fn: str, ts) -> np.ndarray:
    ts = np.atleast_1d(np.asarray(ts, dtype=float))
    if ts.ndim != 1 or ts.size == 0 or np.any((ts < 0) | (ts > 1)):
        raise ValueError(
            f"plot.{fn}: `ts` must be a non-empty 1-D sequence of times in [0, 1], got {ts}"
        )
    return ts


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


def _label_xy(ax, lim):
    ax.set_xlim(lim)
    ax.set_ylim(lim)
    ax.set_aspect("equal")
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")


@_styled
def density_and_velocity(
    coupling: JointGaussianMixture,
    schedule: Schedule,
    ts: Sequence[float],
    *,
    lim: tuple[float, float] | None = None,
    n_grid: int = 120,
    n_arrows: int = 17,
    kind: str = "quiver",
    ncols: int | None = None,
    path=None,
) -> Figure:
    """Exact log-density log p_t (image) and velocity u_t (arrows or streamlines), one panel per t.

    Args:
        coupling: 2-D joint mixture of (X0, X1).
        schedule: affine schedule.
        ts: panel times in [0, 1].
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
    _check_problem("density_and_velocity", coupling, schedule, 2)
    ts = _times("density_and_velocity", ts)
    if kind not in ("quiver", "stream"):
        raise ValueError(
            f"plot.density_and_velocity: `kind` must be 'quiver' or 'stream', got {kind!r}"
        )
    lim = lim or _auto_lim(coupling, schedule, ts)
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
        ax.set_title(f"t = {t:.2f}")
        _label_xy(ax, lim)
    fig.colorbar(im, ax=axes, label=r"$\log p_t(x)$", shrink=0.85)
    fig.suptitle(f"Exact density and velocity ({schedule.name} schedule)")
    return _finish(fig, path)


def _component_colors(k: int) -> np.ndarray:
    cmap = mpl.colormaps["tab10" if k <= 10 else "tab20" if k <= 20 else "turbo"]
    if k <= 20:
        return np.asarray(cmap.colors)[:k, :3]
    return cmap(np.linspace(0, 1, k))[:, :3]


@_styled
def responsibilities(
    coupling: JointGaussianMixture,
    schedule: Schedule,
    ts: Sequence[float],
    *,
    lim: tuple[float, float] | None = None,
    n_grid: int = 150,
    mode: str = "mix",
    ncols: int | None = None,
    path=None,
) -> Figure:
    """Posterior component probabilities P(K = k | X_t = x) on a grid, one panel per t.

    Each component k has a colour; ``mode="mix"`` colours a pixel by the responsibility-weighted
    average colour (soft boundaries blend), ``mode="argmax"`` by the most likely component with
    brightness set by its probability. The component means of p_t are marked with crosses.

    Args:
        coupling: 2-D joint mixture of (X0, X1).
        schedule: affine schedule.
        ts: panel times in [0, 1].
        lim: (lo, hi) window for both axes; default as in ``density_and_velocity``.
        n_grid: image resolution per axis.
        mode: "mix" or "argmax".
        ncols: panels per row.
        path: PNG path to write, or None.

    Returns:
        the Figure, with a categorical colour bar of the components.
    """
    _check_problem("responsibilities", coupling, schedule, 2)
    ts = _times("responsibilities", ts)
    if mode not in ("mix", "argmax"):
        raise ValueError(f"plot.responsibilities: `mode` must be 'mix' or 'argmax', got {mode!r}")
    lim = lim or _auto_lim(coupling, schedule, ts)
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
        ax.set_title(f"t = {t:.2f}")
        _label_xy(ax, lim)
    sm = mpl.cm.ScalarMappable(
        norm=BoundaryNorm(np.arange(k + 1) - 0.5, k), cmap=ListedColormap(colors)
    )
    ticks = np.arange(k) if k <= 20 else np.linspace(0, k - 1, 6).round().astype(int)
    fig.colorbar(sm, ax=axes, ticks=ticks, label="component k", shrink=0.85)
    fig.suptitle(f"Responsibilities $P(k \\mid X_t = x)$ ({mode}, {schedule.name} schedule)")
    return _finish(fig, path)


def _subsample(n: int, max_paths: int) -> np.ndarray:
    return np.arange(n) if n <= max_paths else np.linspace(0, n - 1, max_paths).astype(int)


@_styled
def trajectories(
    traj,
    *,
    ax=None,
    max_paths: int = 200,
    title: str = "Trajectories",
    lim: tuple[float, float] | None = None,
    path=None,
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
    traj = np.asarray(traj)
    if traj.ndim != 3 or traj.shape[-1] != 2 or traj.shape[0] < 2:
        raise ValueError(
            f"plot.trajectories: `traj` must have shape (T >= 2, N, 2), got {traj.shape}"
        )
    traj = traj[:, _subsample(traj.shape[1], max_paths)]
    fig, ax = _single(ax, (4.2, 4.0))
    segs = np.swapaxes(traj, 0, 1)  # (N, T, 2)
    ax.add_collection(LineCollection(segs, colors="0.35", linewidths=0.6, alpha=0.5))
    ax.scatter(traj[0, :, 0], traj[0, :, 1], s=9, c="tab:blue", label="start (t = 0)", zorder=3)
    ax.scatter(
        traj[-1, :, 0],
        traj[-1, :, 1],
        s=14,
        c="tab:red",
        marker="x",
        linewidths=0.9,
        label="end (t = 1)",
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


@_styled
def trajectories_1d(
    ts,
    traj,
    *,
    ax=None,
    max_paths: int = 100,
    title: str = "Trajectories",
    color: str = "white",
    path=None,
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
    ts = np.asarray(ts, dtype=float)
    traj = np.asarray(traj)
    if traj.ndim == 3 and traj.shape[-1] == 1:
        traj = traj[..., 0]
    if ts.ndim != 1 or traj.ndim != 2 or traj.shape[0] != ts.shape[0]:
        raise ValueError(
            f"plot.trajectories_1d: need `ts` (T,) and `traj` (T, N), got "
            f"{ts.shape} and {traj.shape}"
        )
    new = ax is None
    fig, ax = _single(ax)
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


@_styled
def density_over_time(
    coupling: JointGaussianMixture,
    schedule: Schedule,
    xs,
    ts,
    *,
    log: bool = False,
    ax=None,
    title: str | None = None,
    path=None,
) -> Figure:
    """Exact density p_t(x) of a 1-D problem as an image over (t, x).

    Args:
        coupling: 1-D joint mixture of (X0, X1).
        schedule: affine schedule.
        xs: (M,) increasing positions (vertical axis).
        ts: (T,) increasing times in [0, 1] (horizontal axis).
        log: show log p_t(x) (clipped to [max - 12, max]) instead of p_t(x).
        ax: axes to draw into, or None.
        title: axes title; default names the schedule.
        path: PNG path to write, or None.

    Returns:
        the Figure (with a colour bar).
    """
    _check_problem("density_over_time", coupling, schedule, 1)
    ts = _times("density_over_time", ts)
    xs = np.asarray(xs, dtype=float)
    if xs.ndim != 1 or xs.size < 2:
        raise ValueError(f"plot.density_over_time: `xs` must be (M >= 2,), got {xs.shape}")
    logp = _eval(coupling, schedule, ts, xs[:, None], "log_prob")  # (T, M)
    fig, ax = _single(ax, (5.0, 3.4))
    vmax = float(logp.max())
    img = np.maximum(logp, vmax - _LOG_RANGE) if log else np.exp(logp)
    mesh = ax.pcolormesh(ts, xs, img.T, shading="nearest", rasterized=True)
    fig.colorbar(mesh, ax=ax, label=r"$\log p_t(x)$" if log else r"$p_t(x)$")
    ax.set_xlabel("t")
    ax.set_ylabel("x")
    ax.set_title(title or f"Exact density over time ({schedule.name} schedule)")
    return _finish(fig, path)


def _sample_lim(arrays, q: float = 0.5):
    allx = np.concatenate([a.reshape(-1) for a in arrays])
    lo, hi = np.percentile(allx, [q, 100 - q])
    pad = 0.05 * (hi - lo + 1e-12)
    return float(lo - pad), float(hi + pad)


@_styled
def samples_grid(
    samples_by_t: Mapping[float, object],
    *,
    kind: str = "scatter",
    lim: tuple[float, float] | None = None,
    bins: int = 80,
    max_points: int = 5000,
    ncols: int | None = None,
    title: str = "Samples",
    path=None,
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
    if not samples_by_t:
        raise ValueError("plot.samples_grid: `samples_by_t` is empty")
    if kind not in ("scatter", "hist2d"):
        raise ValueError(f"plot.samples_grid: `kind` must be 'scatter' or 'hist2d', got {kind!r}")
    items = [(lab, np.asarray(x)) for lab, x in samples_by_t.items()]
    for lab, x in items:
        if x.ndim != 2 or x.shape[1] != 2:
            raise ValueError(
                f"plot.samples_grid: samples for {lab!r} must be (N, 2), got {x.shape}"
            )
    lim = lim or _sample_lim([x for _, x in items])
    fig, axes = _panels(len(items), ncols, colorbar=kind == "hist2d")
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
        ax.set_title(f"t = {lab:.2f}" if isinstance(lab, float | int) else str(lab))
        _label_xy(ax, lim)
    if kind == "hist2d":
        fig.colorbar(im, ax=axes, label="count", shrink=0.85)
    fig.suptitle(title)
    return _finish(fig, path)


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


@_styled
def histograms(
    samples: Mapping[str, object],
    *,
    reference: Callable | Mapping[str, Callable] | None = None,
    bins: int = 60,
    ncols: int | None = None,
    title: str = "Histograms",
    path=None,
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
    panels = []
    for name, x in samples.items():
        x = np.asarray(x, dtype=float)
        if x.ndim == 1:
            panels.append((str(name), x))
        elif x.ndim == 2:
            panels += [(f"{name}[{i}]", x[:, i]) for i in range(x.shape[1])]
        else:
            raise ValueError(
                f"plot.histograms: `samples[{name!r}]` must be (N,) or (N, d), got {x.shape}"
            )
    if not panels:
        raise ValueError("plot.histograms: `samples` is empty")
    fig, axes = _panels(len(panels), ncols, square=False)
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
