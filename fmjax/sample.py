"""Sampling with diffrax: the flow ODE dx/dt = u_t(x), and SDEs that keep the marginals p_t.

A velocity is any callable ``velocity(t, x) -> (..., d)`` (exact or learned); ``t`` is a scalar
and ``x`` the whole batch, so one solve moves all samples together (one shared step size for
adaptive solvers, with the error measured by the max norm, so every sample meets the tolerance).

ODE (``ode``): fixed-step Euler, Heun, Midpoint, classical RK4, or adaptive Tsit5 / Dopri5, from
t = 0 (source) to t = 1 (target) or backwards (t0=1, t1=0) to map data to the source.

SDE (``sde``): for an affine schedule x_t = b_t x0 + a_t x1 with Gaussian x0 ~ N(0, I), the score
follows from the velocity,

    score_t(x) = (a_t u_t(x) - da_t x) / (b_t (da_t b_t - a_t db_t)),

and for any diffusion coefficient g(t) >= 0 the SDE

    dX = [u_t(X) + g(t)^2 / 2 * score_t(X)] dt + g(t) dW

has the same marginals p_t as the ODE (its Fokker-Planck equation reduces to the continuity
equation). The score is singular at t = 1 (b_1 = 0), so ``sde`` integrates the SDE on
[0, 1 - eps] and covers the last stretch [1 - eps, 1] by one Euler step of the ODE (g = 0), the
"denoising step"; by default eps is one step, 1 / steps. ``eps=0`` is allowed only when
g(1) = 0 (checked eagerly); the score term is then dropped wherever g(t) = 0.

Reversed time (data at s = 0, noise at s = 1, as in the "Matching Flows and Scores" notes):
``sde(..., time="reversed")`` takes a velocity v_s = dx_s/ds, a schedule with x_s = b_s x_data +
a_s x_noise (the same ``Schedule`` type, roles of the endpoints swapped) and g as a function of s.
It flips to the forward clock, t = 1 - s: u_t(x) = -v_{1-t}(x), a_t <- b_{1-t}, b_t <- a_{1-t},
g(t) <- g(1 - t), and runs the same forward solve, so it returns the same samples.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import diffrax
import jax
import jax.numpy as jnp
import lineax
import numpy as np
import optimistix
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

from fmjax import convert
from fmjax.mixtures import GaussianMixture
from fmjax.schedules import Schedule

__all__ = [
    "RK4",
    "ODE_SOLVERS",
    "SDE_SOLVERS",
    "ODESolution",
    "SDESolution",
    "draw_source",
    "ode",
    "sde",
]

Velocity = Callable[[Array, Array], Array]

_rk4_tableau = diffrax.ButcherTableau(
    a_lower=(np.array([0.5]), np.array([0.0, 0.5]), np.array([0.0, 0.0, 1.0])),
    b_sol=np.array([1 / 6, 1 / 3, 1 / 3, 1 / 6]),
    # diffrax needs an error estimate; classical RK4 has no embedded pair, so this is RK4 minus
    # Euler (first order). Use RK4 with fixed steps; for adaptive steps use Tsit5 / Dopri5.
    b_error=np.array([1 / 6 - 1.0, 1 / 3, 1 / 3, 1 / 6]),
    c=np.array([0.5, 0.5, 1.0]),
)


class RK4(diffrax.AbstractERK):
    """Classical 4th-order Runge-Kutta (4 stages), as a diffrax Butcher tableau. Fixed steps."""

    tableau = _rk4_tableau
    interpolation_cls = diffrax.ThirdOrderHermitePolynomialInterpolation.from_k

    def order(self, terms):
        del terms
        return 4


ODE_SOLVERS: dict[str, Callable[[], diffrax.AbstractSolver]] = {
    "euler": diffrax.Euler,
    "heun": diffrax.Heun,
    "midpoint": diffrax.Midpoint,
    "rk4": RK4,
    "tsit5": diffrax.Tsit5,
    "dopri5": diffrax.Dopri5,
}
_ADAPTIVE = frozenset({"tsit5", "dopri5"})

# SDE solvers for additive noise (g depends on t only, so Ito = Stratonovich): Euler-Maruyama,
# Heun (strong order 1 for additive noise) and ShARK (strong order 1.5, uses space-time Levy area).
SDE_SOLVERS: dict[str, Callable[[], diffrax.AbstractSolver]] = {
    "euler": diffrax.Euler,
    "heun": diffrax.Heun,
    "shark": diffrax.ShARK,
}
_SDE_DRIFT_EVALS = {"euler": 1, "heun": 2, "shark": 2}
_LEVY = {"shark": diffrax.SpaceTimeLevyArea}


class ODESolution(NamedTuple):
    """Result of ``ode``.

    Attributes:
        x: state at ``t1``, shape of ``x0`` (..., d).
        ts: saved times (T,), or None.
        xs: states at ``ts``, (T, ..., d), or None.
        nfe: number of (batched) velocity evaluations, int scalar.
        num_steps: number of solver steps, accepted and rejected, int scalar.
    """

    x: Float[Array, "... d"]
    ts: Float[Array, " T"] | None
    xs: Float[Array, "T ... d"] | None
    nfe: Int[Array, ""]
    num_steps: Int[Array, ""]


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


# ----------------------------------------------------------------------------- validation


def _check_x(fn: str, x, name: str = "x0") -> Array:
    x = jnp.asarray(x)
    if x.ndim < 1:
        raise ValueError(f"{fn}: `{name}` must have shape (..., d), got a scalar")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    return x


def _check_time(fn: str, name: str, t) -> float:
    try:
        t = float(t)
    except (TypeError, jax.errors.ConcretizationTypeError):
        raise ValueError(f"{fn}: `{name}` must be a concrete number, got {t!r}") from None
    if not (0.0 <= t <= 1.0):
        raise ValueError(f"{fn}: `{name}` must lie in [0, 1], got {t}")
    return t


def _check_positive_int(fn: str, name: str, n) -> int:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"{fn}: `{name}` must be a positive int, got {n!r}")
    return int(n)


def _check_tol(fn: str, name: str, v) -> float:
    v = float(v)
    if not (np.isfinite(v) and v > 0):
        raise ValueError(f"{fn}: `{name}` must be a finite number > 0, got {v}")
    return v


def _resolve_solver(fn: str, solver, table: dict) -> tuple[str, diffrax.AbstractSolver]:
    if isinstance(solver, str) and solver.lower() in table:
        name = solver.lower()
        return name, table[name]()
    raise ValueError(f"{fn}: `solver` must be one of {sorted(table)}, got {solver!r}")


def _check_save_ts(fn: str, save_ts, t0: float, t1: float) -> np.ndarray:
    try:
        ts = np.asarray(save_ts, dtype=np.float64)
    except (TypeError, jax.errors.ConcretizationTypeError):
        raise ValueError(f"{fn}: `save_ts` must be a concrete 1-D array of times") from None
    if ts.ndim != 1 or ts.size < 1:
        raise ValueError(f"{fn}: `save_ts` must be a non-empty 1-D array, got shape {ts.shape}")
    lo, hi = min(t0, t1), max(t0, t1)
    if np.any(ts < lo) or np.any(ts > hi):
        raise ValueError(f"{fn}: `save_ts` must lie between t0={t0} and t1={t1}")
    if np.any(np.diff(ts) * np.sign(t1 - t0) <= 0):
        raise ValueError(f"{fn}: `save_ts` must be strictly monotone from t0 towards t1")
    return ts


# ----------------------------------------------------------------------------- integration


def _nfe(solver: diffrax.AbstractSolver, num_steps):
    """Velocity evaluations made by diffrax for ``num_steps`` steps (accepted and rejected).

    Checked against a counting callback in tests/test_sample.py (diffrax's initial step-size
    guess for wrapped ODE terms costs no evaluation: it starts adaptive solves at dt0 = 0.01).
    """
    if isinstance(solver, diffrax.Euler):
        return num_steps
    tab = solver.tableau
    if tab.fsal:  # the first stage of each step is the last of the previous one
        return 1 + (tab.num_stages - 1) * num_steps  # +1: the first stage at t0
    return tab.num_stages * num_steps


def _integrate(
    fn: str,
    vector_field: Callable,
    y0: Any,
    args: Any,
    *,
    solver: str | None,
    steps: int | None,
    t0: float,
    t1: float,
    rtol: float,
    atol: float,
    save_ts,
    max_steps: int | None,
    adjoint: diffrax.AbstractAdjoint | None,
):
    """Validated diffrax ODE solve of ``dy/dt = vector_field(t, y, args)``.

    Returns ``(y1, ts, ys, nfe, num_steps)`` with ``ts``/``ys`` None unless ``save_ts`` given.
    """
    t0 = _check_time(fn, "t0", t0)
    t1 = _check_time(fn, "t1", t1)
    if t0 == t1:
        raise ValueError(f"{fn}: `t0` and `t1` must differ, both are {t0}")
    name, slv = _resolve_solver(fn, solver, ODE_SOLVERS)
    rtol, atol = _check_tol(fn, "rtol", rtol), _check_tol(fn, "atol", atol)
    dtype = jax.tree.leaves(y0)[0].dtype
    fixed = steps is not None
    if fixed:
        steps = _check_positive_int(fn, "steps", steps)
        controller = diffrax.StepTo(ts=jnp.linspace(t0, t1, steps + 1, dtype=dtype))
        dt0, max_steps = None, steps
    elif name in _ADAPTIVE:
        controller = diffrax.PIDController(rtol=rtol, atol=atol, norm=optimistix.max_norm)
        dt0 = None
        max_steps = _check_positive_int(fn, "max_steps", 4096 if max_steps is None else max_steps)
    else:
        raise ValueError(
            f"{fn}: solver {name!r} is fixed-step: pass `steps`, or use an adaptive solver "
            f"({sorted(_ADAPTIVE)}) with rtol/atol"
        )
    if save_ts is None:
        saveat = diffrax.SaveAt(t1=True)
    else:
        ts_np = _check_save_ts(fn, save_ts, t0, t1)
        saveat = diffrax.SaveAt(t1=True, ts=jnp.asarray(ts_np, dtype))
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(vector_field),
        slv,
        t0=t0,
        t1=t1,
        dt0=dt0,
        y0=y0,
        args=args,
        saveat=saveat,
        stepsize_controller=controller,
        max_steps=max_steps,
        adjoint=diffrax.RecursiveCheckpointAdjoint() if adjoint is None else adjoint,
    )
    num_steps = sol.stats["num_steps"]
    nfe = _nfe(slv, num_steps)
    y1 = jax.tree.map(lambda a: a[-1], sol.ys)
    if save_ts is None:
        return y1, None, None, nfe, num_steps
    ys = jax.tree.map(lambda a: a[:-1], sol.ys)
    return y1, sol.ts[:-1], ys, nfe, num_steps


def _velocity_field(t, x, velocity):
    return velocity(t, x)


def _as_pytree(velocity: Velocity) -> Velocity:
    """A ``functools.partial`` becomes a ``jax.tree_util.Partial``: the arrays it binds (model
    parameters, mixtures) are then traced rather than baked in as constants, so a new partial of
    the same function with same-shaped arrays reuses the compiled solve instead of recompiling.
    Left as is when the function or a non-array bound value is unhashable.
    """
    if type(velocity) is not functools.partial:
        return velocity
    pv = jax.tree_util.Partial(velocity.func, *velocity.args, **velocity.keywords)
    try:
        hash(pv.func)
        for leaf in jax.tree.leaves(pv):
            if not isinstance(leaf, jax.Array | np.ndarray):
                hash(leaf)
    except TypeError:
        return velocity
    return pv


def ode(
    velocity: Velocity,
    x0: Float[ArrayLike, "... d"],
    *,
    solver: str = "tsit5",
    steps: int | None = None,
    t0: float = 0.0,
    t1: float = 1.0,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    save_ts: Float[ArrayLike, " T"] | None = None,
    max_steps: int | None = None,
    adjoint: diffrax.AbstractAdjoint | None = None,
) -> ODESolution:
    """Integrate dx/dt = velocity(t, x) from ``t0`` to ``t1``, all samples in one batched solve.

    Args:
        velocity: ``(t, x) -> (..., d)``, t a scalar, x the whole batch (..., d).
        x0: initial states at ``t0``, shape (..., d).
        solver: "euler", "heun", "midpoint", "rk4" (fixed steps: pass ``steps``), or "tsit5",
            "dopri5" (adaptive with ``rtol``/``atol`` unless ``steps`` is given).
        steps: number of equal steps; None means adaptive steps.
        t0: start time in [0, 1]; 0 is the source.
        t1: end time in [0, 1]; t1 < t0 integrates backwards (e.g. t0=1, t1=0: data -> source).
        rtol, atol: tolerances of the adaptive controller (max norm over all samples).
        save_ts: optional times (T,), monotone from t0 to t1, at which to return the trajectory
            (dense interpolation between steps; exact on step times).
        max_steps: cap on adaptive steps (default 4096).
        adjoint: diffrax adjoint for reverse-mode gradients (default RecursiveCheckpointAdjoint).

    Returns:
        ``ODESolution(x, ts, xs, nfe, num_steps)``; ``xs`` is (T, ..., d) when ``save_ts`` given.

    Raises:
        ValueError: naming the argument, for a bad solver, times, steps, tolerances or shapes.
    """
    x0 = _check_x("ode", x0)
    if not callable(velocity):
        raise ValueError(f"ode: `velocity` must be a callable (t, x) -> x-shaped, got {velocity!r}")
    x1, ts, xs, nfe, num_steps = _integrate(
        "ode",
        _velocity_field,
        x0,
        _as_pytree(velocity),
        solver=solver,
        steps=steps,
        t0=t0,
        t1=t1,
        rtol=rtol,
        atol=atol,
        save_ts=save_ts,
        max_steps=max_steps,
        adjoint=adjoint,
    )
    return ODESolution(x1, ts, xs, nfe, num_steps)


def draw_source(
    key: PRNGKeyArray,
    n: int,
    dim: int | None = None,
    source: GaussianMixture | Callable[[PRNGKeyArray, int], Array] | None = None,
    dtype=None,
) -> Float[Array, "n d"]:
    """Draw ``n`` source samples x0 deterministically from ``key``.

    Args:
        key: PRNG key.
        n: number of samples (static).
        dim: dimension d; required for the default source, checked against the others.
        source: None for N(0, I), a ``GaussianMixture``, or a sampler ``(key, n) -> (n, d)``.
        dtype: float dtype for the default source (default: JAX's default float).

    Returns:
        (n, d) samples.
    """
    n = _check_positive_int("draw_source", "n", n)
    if source is None:
        if dim is None:
            raise ValueError("draw_source: `dim` is required for the default N(0, I) source")
        dim = _check_positive_int("draw_source", "dim", dim)
        return jax.random.normal(key, (n, dim), dtype or jnp.result_type(float))
    if isinstance(source, GaussianMixture):
        x = source.sample(key, n)
    elif callable(source):
        x = jnp.asarray(source(key, n))
    else:
        raise ValueError(
            f"draw_source: `source` must be None, a GaussianMixture or a callable (key, n), "
            f"got {source!r}"
        )
    if x.ndim != 2 or x.shape[0] != n or (dim is not None and x.shape[1] != dim):
        raise ValueError(f"draw_source: `source` returned shape {x.shape}, expected ({n}, d)")
    return x


# ----------------------------------------------------------------------------- SDE


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

    The score comes from the velocity (module docstring), valid for Gaussian x0 ~ N(0, I) and
    the affine ``schedule`` the velocity was built with. ``diffusion = 0`` gives the ODE.

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
