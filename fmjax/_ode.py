"""ODE sampling: integrate the flow dx/dt = u_t(x) with diffrax (public as ``fmjax.sample.ode``).

Fixed-step Euler, Heun, Midpoint and classical RK4 (``RK4``, a Butcher tableau), or adaptive
Tsit5 / Dopri5 with a max-norm PID controller, all samples in one batched solve, forwards or
backwards in time; ``_integrate`` is the validated solve shared with ``fmjax.likelihood`` and
``_nfe`` counts the velocity evaluations a solve made.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import optimistix
from jaxtyping import Array, ArrayLike, Float, Int

from fmjax._sample_common import (
    Velocity,
    _as_pytree,
    _check_positive_int,
    _check_save_ts,
    _check_time,
    _check_tol,
    _check_x,
    _resolve_solver,
)

__all__ = ["RK4", "ODE_SOLVERS", "ODESolution", "ode"]


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
