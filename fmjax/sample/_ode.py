"""ODE sampling: carry samples along the flow dx/dt = u_t(x), forwards or backwards in time."""

from __future__ import annotations

from typing import NamedTuple

import diffrax
from jaxtyping import Array, ArrayLike, Float, Int

from fmjax import _checks, _solve
from fmjax._typing import Velocity
from fmjax.schedules import Schedule

__all__ = ["ODESolution", "ode"]


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


def _velocity_field(t, x, velocity):
    return _solve.check_output("sample.ode", "velocity", velocity(t, x), x)


def ode(
    velocity: Velocity,
    x0: Float[ArrayLike, "... d"],
    *,
    solver: str | diffrax.AbstractSolver = "tsit5",
    stepsize_controller: diffrax.AbstractStepSizeController | None = None,
    steps: int | None = None,
    t0: float | None = None,
    t1: float | None = None,
    schedule: Schedule | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    save_ts: Float[ArrayLike, " T"] | None = None,
    max_steps: int | None = None,
    adjoint: diffrax.AbstractAdjoint | None = None,
) -> ODESolution:
    """Integrate dx/dt = velocity(t, x) from ``t0`` to ``t1``, all samples in one batched solve.

    ``t`` is a scalar and ``x`` the whole batch, so adaptive solvers take one shared step size
    with the error measured in the max norm: every sample meets the tolerance.

    Args:
        velocity: ``(t, x) -> (..., d)``, t a scalar, x the whole batch (..., d).
        x0: initial states at ``t0``, shape (..., d).
        solver: "euler", "heun", "midpoint", "rk4" (fixed steps: pass ``steps``), "tsit5",
            "dopri5" (adaptive unless ``steps`` is given), or a diffrax explicit Runge-Kutta
            solver object (e.g. ``diffrax.Tsit5()``, ``fmjax.sample.RK4()``).
        stepsize_controller: a diffrax adaptive controller (e.g. ``diffrax.PIDController``; then
            ``rtol``/``atol`` are ignored) or ``diffrax.StepTo``; None means ``steps`` equal steps
            or, for an adaptive solver, a max-norm PID controller with ``rtol``/``atol``.
        steps: number of equal steps; None means adaptive steps (or the controller's).
        t0: start time (default: the start of the valid interval, 0 for the source).
        t1: end time (default: the end of the valid interval); t1 < t0 integrates backwards
            (e.g. t0=1, t1=0 maps data to the source).
        schedule: the schedule of the velocity, whose valid interval gives the default times and
            bounds explicit ones; default ``velocity.schedule`` if the velocity has one (the exact
            ``fmjax.exact.VelocityField`` has), else times default to 0 and 1.
        rtol, atol: tolerances of the default adaptive controller (max norm over all samples).
        save_ts: optional times (T,), monotone from t0 to t1, at which to return the trajectory
            (dense interpolation between steps; exact on step times).
        max_steps: cap on adaptive steps (default 4096).
        adjoint: diffrax adjoint for reverse-mode gradients (default RecursiveCheckpointAdjoint).

    Returns:
        ``ODESolution(x, ts, xs, nfe, num_steps)``; ``xs`` is (T, ..., d) when ``save_ts`` given.

    Raises:
        TypeError: for a velocity, solver, controller or schedule of the wrong type.
        ValueError: naming the argument, for bad times, steps, tolerances, shapes, a controller
            that does not fit the solver, or (eagerly) a solve that fails or returns non-finite
            states, e.g. one that runs into the singular end of a schedule.
    """
    fn = "sample.ode"
    _checks.check_callable(fn, "velocity", velocity, "a callable (t, x) -> (..., d)")
    x0 = _solve.check_x(fn, x0)
    _solve.check_field(fn, "velocity", velocity, x0)
    schedule = _solve.resolve_schedule(fn, schedule, velocity)
    t0, t1 = _solve.resolve_times(fn, t0, t1, schedule, x0.dtype)
    clean, bad = _solve.finite_rows(fn, "x0", x0, "sample")
    out = _solve.solve(
        fn,
        _velocity_field,
        clean,
        _solve.as_pytree(velocity),
        solver=solver,
        stepsize_controller=stepsize_controller,
        steps=steps,
        t0=t0,
        t1=t1,
        rtol=rtol,
        atol=atol,
        save_ts=save_ts,
        max_steps=max_steps,
        adjoint=adjoint,
        schedule=schedule,
    )
    xs = None if out.ys is None else _solve.mask_rows(bad, out.ys)
    return ODESolution(_solve.mask_rows(bad, out.y1), out.ts, xs, out.nfe, out.num_steps)
