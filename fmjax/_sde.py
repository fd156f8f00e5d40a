"""SDE sampling that keeps the marginals p_t (public as ``fmjax.sample.sde``).

The drift u_t + g(t)^2 / 2 * score_t, with the score derived from the velocity for Gaussian
x0 ~ N(0, I) (see the ``fmjax.sample`` module docstring), and diffusion g(t), solved by diffrax
(Euler-Maruyama, Heun, ShARK) on [0, 1 - eps] followed by one Euler ODE denoising step; the
reversed-time convention is handled by flipping velocity, schedule and g to the forward clock.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import diffrax
import jax
import jax.numpy as jnp
import lineax
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

from fmjax import convert
from fmjax._sample_common import (
    Velocity,
    _as_pytree,
    _check_positive_int,
    _check_x,
    _resolve_solver,
)
from fmjax.schedules import Schedule

__all__ = ["SDE_SOLVERS", "SDESolution", "sde"]


# SDE solvers for additive noise (g depends on t only, so Ito = Stratonovich): Euler-Maruyama,
# Heun (strong order 1 for additive noise) and ShARK (strong order 1.5, uses space-time Levy area).
SDE_SOLVERS: dict[str, Callable[[], diffrax.AbstractSolver]] = {
    "euler": diffrax.Euler,
    "heun": diffrax.Heun,
    "shark": diffrax.ShARK,
}
_SDE_DRIFT_EVALS = {"euler": 1, "heun": 2, "shark": 2}
_LEVY = {"shark": diffrax.SpaceTimeLevyArea}


class SDESolution(NamedTuple):
    """Result of ``sde``.

    Attributes:
        x: samples at the data end (t = 1, or s = 0 in reversed time), shape of ``x0``.
        ts: the step grid in the caller's clock (steps + 1,), if ``save_trajectory``, else None.
        xs: states on that grid, (steps + 1, ..., d), or None.
        nfe: number of (batched) velocity evaluations, int scalar.
    """

    x: Float[Array, "... d"]
    ts: Float[Array, " T"] | None
    xs: Float[Array, "T ... d"] | None
    nfe: Int[Array, ""]


def _flipped_coeffs(t, schedule):
    a, b, da, db = schedule(1.0 - t)
    return b, a, -db, -da


def _flip_schedule(schedule: Schedule) -> Schedule:
    """Forward-clock schedule of a reversed-time one: x_t = x_{s=1-t}."""
    return Schedule(f"flip({schedule.name})", _flipped_coeffs, (schedule,))


@functools.partial(jax.tree_util.register_dataclass, data_fields=["velocity"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class _Flipped:
    """Forward-clock velocity u_t(x) = -v_{1-t}(x) of a reversed-time velocity v."""

    velocity: Velocity

    def __call__(self, t, x):
        return -self.velocity(1.0 - t, x)


def _as_diffusion(fn: str, diffusion) -> Callable[[Array], Array]:
    if callable(diffusion):
        return diffusion
    try:
        g = float(diffusion)
    except (TypeError, jax.errors.ConcretizationTypeError):
        raise ValueError(
            f"{fn}: `diffusion` must be a number >= 0 or a callable t -> g(t), got {diffusion!r}"
        ) from None
    return _Constant(jnp.asarray(g))


@functools.partial(jax.tree_util.register_dataclass, data_fields=["value"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class _Constant:
    """g(t) = value; the value is a pytree leaf, so a new constant does not recompile."""

    value: Array

    def __call__(self, t):
        return jnp.broadcast_to(self.value, jnp.shape(t)).astype(jnp.result_type(t))


def _check_diffusion(fn: str, g, eps: float) -> None:
    """g(t) must be finite, >= 0 and scalar on [0, 1]; g(1) = 0 when eps = 0."""
    probe = np.linspace(0.0, 1.0, 33)
    try:
        vals = np.asarray(jax.vmap(g)(jnp.asarray(probe)), dtype=np.float64)
    except Exception as e:  # noqa: BLE001 - report any failure of a user callable
        raise ValueError(f"{fn}: `diffusion` failed on scalar times in [0, 1]: {e}") from None
    if vals.shape != probe.shape:
        raise ValueError(f"{fn}: `diffusion` must return a scalar g(t), got shape {vals.shape[1:]}")
    if not np.all(np.isfinite(vals) & (vals >= 0)):
        raise ValueError(f"{fn}: `diffusion` must be finite and >= 0 on [0, 1]")
    if eps == 0 and vals[-1] != 0:
        raise ValueError(
            f"{fn}: with eps=0 the SDE runs up to t=1 where the score is singular, so "
            f"`diffusion` must vanish there (got g(1)={vals[-1]:.3g}); use eps > 0 (default)"
        )


class _SDEArgs(NamedTuple):
    velocity: Velocity
    schedule: Schedule
    diffusion: Callable


def _sde_drift(t, x, args: _SDEArgs):
    u = args.velocity(t, x)
    g = args.diffusion(t)
    g2 = g * g
    s = convert.velocity_to_score(args.schedule, t, x, u)
    # Where g = 0 (e.g. g(1) = 0 with eps = 0) drop the score term: it may be inf there.
    return jnp.where(g2 > 0, u + 0.5 * g2 * s, u)


def _sde_diffusion(t, x, args: _SDEArgs):
    return lineax.DiagonalLinearOperator(jnp.broadcast_to(args.diffusion(t), x.shape))


def sde(
    velocity: Velocity,
    schedule: Schedule,
    x0: Float[ArrayLike, "... d"],
    key: PRNGKeyArray,
    *,
    diffusion: float | Callable[[Array], Array] = 1.0,
    steps: int = 100,
    solver: str = "euler",
    eps: float | None = None,
    brownian: str = "virtual",
    time: str = "forward",
    save_trajectory: bool = False,
) -> SDESolution:
    """Sample with the Ito SDE dX = [u + g^2/2 score] dt + g dW, which keeps the marginals p_t.

    The score comes from the velocity (``fmjax.sample`` module docstring), valid for Gaussian
    x0 ~ N(0, I) and the affine ``schedule`` the velocity was built with. ``diffusion = 0`` gives
    the ODE.

    Args:
        velocity: ``(t, x) -> (..., d)`` (in the caller's clock, see ``time``).
        schedule: the affine schedule of the velocity.
        x0: source samples from N(0, I), shape (..., d).
        key: PRNG key of the Brownian motion.
        diffusion: g(t) >= 0, a number or an elementwise callable of the caller's time.
        steps: total number of equal steps, including the final denoising ODE step.
        solver: "euler" (Euler-Maruyama), "heun" or "shark" (higher order for additive noise).
        eps: the SDE runs on [0, 1 - eps], then one Euler ODE step covers [1 - eps, 1]. Default
            1 / steps (the last step of the grid); 0 requires g(1) = 0 (no denoising step).
        brownian: "virtual" (``diffrax.VirtualBrownianTree``) or "unsafe"
            (``diffrax.UnsafeBrownianPath``, faster, fixed forward steps only). Different paths.
        time: "forward" (t = 0 noise, t = 1 data) or "reversed" (s = 0 data, s = 1 noise;
            the velocity is dx/ds and the schedule reads x_s = b_s x_data + a_s x_noise).
        save_trajectory: also return the states on the step grid.

    Returns:
        ``SDESolution(x, ts, xs, nfe)``.

    Raises:
        ValueError: naming the argument, for bad solver, steps, eps, diffusion or shapes.
    """
    fn = "sde"
    x0 = _check_x(fn, x0)
    if not callable(velocity):
        raise ValueError(f"{fn}: `velocity` must be a callable (t, x) -> x-shaped")
    if not isinstance(schedule, Schedule):
        raise ValueError(f"{fn}: `schedule` must be an fmjax Schedule, got {type(schedule)}")
    name, slv = _resolve_solver(fn, solver, SDE_SOLVERS)
    steps = _check_positive_int(fn, "steps", steps)
    if brownian not in ("virtual", "unsafe"):
        raise ValueError(f"{fn}: `brownian` must be 'virtual' or 'unsafe', got {brownian!r}")
    if time not in ("forward", "reversed"):
        raise ValueError(f"{fn}: `time` must be 'forward' or 'reversed', got {time!r}")
    g = _as_diffusion(fn, diffusion)
    if eps is None:
        eps = 1.0 / steps
    eps = float(eps)
    if not (0.0 <= eps < 1.0):
        raise ValueError(f"{fn}: `eps` must lie in [0, 1), got {eps}")
    if eps > 0 and steps < 2:
        raise ValueError(f"{fn}: `steps` must be >= 2 with eps > 0 (one SDE step + denoising)")
    velocity, g = _as_pytree(velocity), _as_pytree(g)
    if time == "reversed":
        velocity, schedule, g = _Flipped(velocity), _flip_schedule(schedule), _FlipG(g)
    _check_diffusion(fn, g, eps)

    dtype = x0.dtype
    n_sde = steps - 1 if eps > 0 else steps
    t_end = 1.0 - eps
    grid = jnp.linspace(0.0, t_end, n_sde + 1, dtype=dtype)
    levy = _LEVY.get(name, diffrax.BrownianIncrement)
    if brownian == "virtual":
        bm = diffrax.VirtualBrownianTree(
            0.0,
            t_end,
            tol=0.25 * t_end / n_sde,
            shape=jax.ShapeDtypeStruct(x0.shape, dtype),
            key=key,
            levy_area=levy,
        )
    else:
        bm = diffrax.UnsafeBrownianPath(
            shape=jax.ShapeDtypeStruct(x0.shape, dtype), key=key, levy_area=levy
        )
    terms = diffrax.MultiTerm(diffrax.ODETerm(_sde_drift), diffrax.ControlTerm(_sde_diffusion, bm))
    args = _SDEArgs(velocity, schedule, g)
    saveat = diffrax.SaveAt(t0=True, steps=True) if save_trajectory else diffrax.SaveAt(t1=True)
    sol = diffrax.diffeqsolve(
        terms,
        slv,
        t0=0.0,
        t1=t_end,
        dt0=None,
        y0=x0,
        args=args,
        saveat=saveat,
        stepsize_controller=diffrax.StepTo(ts=grid),
        max_steps=n_sde,
        # UnsafeBrownianPath cannot be replayed for a backward pass: forward-mode autodiff only.
        adjoint=diffrax.ForwardMode()
        if brownian == "unsafe"
        else diffrax.RecursiveCheckpointAdjoint(),
    )
    x = sol.ys[-1]
    nfe = _SDE_DRIFT_EVALS[name] * sol.stats["num_steps"]
    ts = grid
    if eps > 0:  # denoising step: Euler step of the probability-flow ODE over [1 - eps, 1]
        x = x + eps * velocity(jnp.asarray(t_end, dtype), x)
        nfe = nfe + 1
        ts = jnp.concatenate([grid, jnp.ones((1,), dtype)])
    if not save_trajectory:
        return SDESolution(x, None, None, nfe)
    xs = sol.ys if eps == 0 else jnp.concatenate([sol.ys, x[None]], axis=0)
    if time == "reversed":
        ts = 1.0 - ts
    return SDESolution(x, ts, xs, nfe)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["g"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class _FlipG:
    """Diffusion coefficient in the forward clock: g_fwd(t) = g(1 - t)."""

    g: Callable

    def __call__(self, t):
        return self.g(1.0 - t)
