"""The validated diffrax ODE solve shared by ``fmjax.sample`` and ``fmjax.likelihood``.

Resolves the solver (a name or a diffrax solver object) and the step-size controller (fixed
``steps``, a controller object, or the default max-norm PID controller of an adaptive solver),
takes default times from a schedule's valid interval, checks every argument eagerly, counts the
vector-field evaluations, and turns a failed or non-finite eager solve into a ``ValueError``.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix
from jaxtyping import Array, ArrayLike, Float, Int

from fmjax import _checks
from fmjax._typing import PyTree, Velocity
from fmjax.schedules import Schedule

__all__ = [
    "ODE_SOLVERS",
    "RK4",
    "Solved",
    "as_pytree",
    "check_result",
    "check_time",
    "check_x",
    "finite_rows",
    "mask_rows",
    "promote_to_clock",
    "nfe",
    "resolve_schedule",
    "resolve_times",
    "solve",
]

_rk4_tableau = diffrax.ButcherTableau(
    a_lower=(np.array([0.5]), np.array([0.0, 0.5]), np.array([0.0, 0.0, 1.0])),
    b_sol=np.array([1 / 6, 1 / 3, 1 / 3, 1 / 6]),
    # diffrax needs an error estimate; classical RK4 has no embedded pair, so this is RK4 minus
    # Euler (first order). Use RK4 with fixed steps; for adaptive steps use Tsit5 / Dopri5.
    b_error=np.array([1 / 6 - 1.0, 1 / 3, 1 / 3, 1 / 6]),
    c=np.array([0.5, 0.5, 1.0]),
)


class RK4(diffrax.AbstractERK):
    """Classical 4th-order Runge-Kutta (4 stages), as a diffrax Butcher tableau. Fixed steps.

    Attributes:
        scan_kind: the one constructor argument (from ``diffrax.AbstractRungeKutta``): how the
            stages of a step are looped over, None (diffrax's default, "checkpointed"), "lax",
            "checkpointed" or "bounded"; leave it None unless tuning diffrax.
        tableau: the Butcher tableau: the classical RK4 weights, with an error estimate of RK4
            minus Euler (first order, too crude for adaptive step-size control).
        interpolation_cls: dense output between steps (third-order Hermite), for ``save_ts``.
    """

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
# Solvers that take fixed steps: no error estimate, or (RK4, Heun, Midpoint) one too crude to
# drive the default controller. Given an explicit adaptive controller, Heun and Midpoint run.
_FIXED_STEP = (diffrax.Euler, diffrax.Heun, diffrax.Midpoint, RK4)
_DEFAULT_MAX_STEPS = 4096


class Solved(NamedTuple):
    """Result of ``solve``: the state at t1, the saved times and states (or None), counts."""

    y1: PyTree
    ts: Float[Array, " T"] | None
    ys: PyTree | None
    nfe: Int[Array, ""]
    num_steps: Int[Array, ""]


# ----------------------------------------------------------------------------- arguments


def check_x(fn: str, x: Float[ArrayLike, "... d"], name: str = "x0") -> Float[Array, "... d"]:
    """States as a float32 / float64 array of shape (..., d) with d >= 1.

    Integers are cast to the default float; complex and other float dtypes (float16, bfloat16)
    are a ``TypeError``.
    """
    x = _checks.check_real_array(fn, name, x)
    if x.ndim < 1:
        _checks.fail(fn, name, "an array of shape (..., d)", "a scalar")
    if x.shape[-1] < 1:
        _checks.fail(fn, name, "an array of shape (..., d) with d >= 1", f"shape {x.shape}")
    return x


def check_output(fn: str, name: str, out: Any, x: Array) -> Array:
    """``out = field(t, x)`` must be shaped like ``x``: checked on shapes while the solver traces
    the field (no extra trace), a ``ValueError`` naming ``name`` otherwise."""
    shape = getattr(out, "shape", None)
    if shape != x.shape:
        got = f"output of shape {shape}" if shape is not None else type(out).__name__
        _checks.fail(fn, name, f"a callable (t, x) -> array of x's shape {x.shape}", got)
    return out


def promote_to_clock(x: Array) -> Array:
    """``x`` in the promoted dtype of itself and the clock (Python float times: float64 under
    x64, else float32), the dtype every solve computes in."""
    return x.astype(jnp.promote_types(x.dtype, jnp.result_type(float)))


def finite_rows(fn: str, name: str, x: Array, result: str) -> tuple[Array, Array]:
    """fmjax's NaN policy for points in, one result per point out: ``(x_clean, bad)``.

    ``bad`` (shape x.shape[:-1]) marks the points with a non-finite coordinate; ``x_clean`` has
    them set to 0, so they cannot poison the shared adaptive steps of the others. The caller
    sets its results for those points to NaN (``mask_rows``). Eagerly, a ``RuntimeWarning``
    names ``name`` and the rows (traced inputs are masked the same way, without a warning).
    """
    bad = ~jnp.all(jnp.isfinite(x), axis=-1)
    if _checks.is_concrete(x):
        rows = np.argwhere(np.asarray(bad))
        if rows.size:
            shown = [tuple(r) if r.size > 1 else int(r[0]) for r in rows[:10]]
            more = f" and {len(rows) - 10} more" if len(rows) > 10 else ""
            warnings.warn(
                f"{fn}: `{name}` has {len(rows)} point(s) with non-finite coordinates, at "
                f"{shown}{more}: their {result} is NaN; the other points are computed as usual",
                RuntimeWarning,
                stacklevel=3,
            )
    return jnp.where(bad[..., None], jnp.zeros((), x.dtype), x), bad


def mask_rows(bad: Array, y: Array, axis_d: bool = True) -> Array:
    """``y`` with the points marked by ``bad`` set to NaN (``axis_d``: y has a trailing d)."""
    b = bad[..., None] if axis_d else bad
    return jnp.where(b, jnp.asarray(jnp.nan, y.dtype), y)


def as_pytree(velocity: Velocity) -> Velocity:
    """A ``functools.partial`` becomes a ``jax.tree_util.Partial``.

    The arrays it binds (model parameters, mixtures) are then traced rather than baked in as
    constants, so a new partial of the same function with same-shaped arrays reuses the compiled
    solve. Left as is when the function or a non-array bound value is unhashable.
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


FIELD_CONTRACT = "a field (t, x) -> (..., d) taking t a scalar and t of shape x.shape[:-1]"


@eqx.filter_jit
def _probe(field, t, x):
    return field(t, x)


def check_field(fn: str, name: str, field: Any, x: Any) -> Callable:
    """``field`` if it keeps fmjax's one calling contract for fields on points shaped like ``x``.

    Every entry point may call a field ``(t, x)`` with t a scalar (the samplers: one time per
    step) or with t of shape x.shape[:-1] (the losses: one time per point), so a field must take
    both. Each form is traced abstractly (no compile, no FLOP, also under an outer jit), through
    a jitted probe whose trace is cached like the solve's (a new partial of the same function
    with same-shaped arrays traces nothing). A form that raises is named in a ``TypeError``, a
    form that returns another shape than x's in a ``ValueError``.
    """
    _checks.check_callable(fn, name, field, FIELD_CONTRACT)
    shape, dtype = tuple(np.shape(x)), getattr(x, "dtype", None)
    dtype = np.dtype(dtype) if dtype is not None else np.result_type(float)
    xs = jax.ShapeDtypeStruct(shape, dtype)
    tree = as_pytree(field)
    try:  # the cached probe needs a hashable static part; else a plain abstract trace
        hash(eqx.partition(tree, eqx.is_array)[1])
        trace = functools.partial(eqx.filter_eval_shape, _probe, tree)
    except TypeError:
        trace = functools.partial(jax.eval_shape, tree)
    for form, t_shape in (("a scalar t", ()), (f"t of shape {shape[:-1]}", shape[:-1])):
        try:
            out = trace(jax.ShapeDtypeStruct(t_shape, dtype), xs)
        except Exception as e:  # noqa: BLE001 - report any failure of a user callable
            message = str(e).strip().splitlines()[0] if str(e).strip() else ""
            got = f"with {form} and x of shape {shape} it raised {type(e).__name__}: {message}"
            _checks.fail(fn, name, FIELD_CONTRACT, got, TypeError)
        if getattr(out, "shape", None) != shape:
            got = getattr(out, "shape", type(out).__name__)
            what = f"{FIELD_CONTRACT}, returning x's shape {shape}"
            _checks.fail(fn, name, what, f"with {form}: output {got}")
    return field


def resolve_schedule(fn: str, schedule: Schedule | None, velocity: Any) -> Schedule | None:
    """The explicit ``schedule``, else ``velocity.schedule`` when that is a Schedule, else None."""
    if schedule is not None:
        return _checks.check_instance(fn, "schedule", schedule, Schedule, "an fmjax Schedule")
    found = getattr(velocity, "schedule", None)
    return found if isinstance(found, Schedule) else None


def _interval(schedule: Schedule | None) -> tuple[float, float]:
    return (0.0, 1.0) if schedule is None else schedule.interval


def check_time(fn: str, name: str, t: Any, schedule: Schedule | None) -> float:
    """A concrete time inside the schedule's valid interval (or [0, 1] without a schedule)."""
    t = _checks.as_float(fn, name, t)
    if schedule is None:
        return _checks.check_interval_time(fn, name, t, (0.0, 1.0), "the unit interval")
    schedule.check_times(fn, name, t)
    return t


def resolve_times(
    fn: str, t0: float | None, t1: float | None, schedule: Schedule | None, dtype: Any = None
) -> tuple[float, float]:
    """``t0``/``t1`` with None replaced by the ends of the schedule's valid interval (0, 1);
    they must differ in ``dtype`` (the states' dtype) when given."""
    lo, hi = _interval(schedule)
    t0 = lo if t0 is None else check_time(fn, "t0", t0, schedule)
    t1 = hi if t1 is None else check_time(fn, "t1", t1, schedule)
    check_distinct_times(fn, "t1", t1, t0, dtype)
    return t0, t1


def check_distinct_times(fn: str, name: str, t: float, other: float, dtype: Any = None) -> None:
    """``t`` must differ from ``other``, also once both are rounded to ``dtype`` (the states'):
    1e-8 apart are one float32 time, a solve of zero length."""
    if t == other:
        _checks.fail(fn, name, f"different from {other:g}", t)
    if dtype is not None and np.asarray(t, dtype) == np.asarray(other, dtype):
        what = f"different from {other!r} in {np.dtype(dtype)} (the states' dtype)"
        _checks.fail(fn, name, what, t)


def _resolve_solver(fn: str, solver: Any) -> diffrax.AbstractSolver:
    if isinstance(solver, str):
        if solver.lower() not in ODE_SOLVERS:
            _checks.fail(fn, "solver", f"one of {sorted(ODE_SOLVERS)} or a diffrax solver", solver)
        return ODE_SOLVERS[solver.lower()]()
    # Explicit Runge-Kutta solvers (and Euler): their evaluation count follows from the tableau.
    what = "a solver name or a diffrax explicit Runge-Kutta solver (Euler or AbstractERK)"
    return _checks.check_instance(fn, "solver", solver, (diffrax.Euler, diffrax.AbstractERK), what)


def _controller(
    fn: str, slv, stepsize_controller, steps, t0, t1, rtol, atol, max_steps, dtype
) -> tuple[diffrax.AbstractStepSizeController, int]:
    """The step-size controller and the step cap of the solve."""
    if steps is not None:
        steps = _checks.check_int(fn, "steps", steps)
        if stepsize_controller is not None:
            _checks.fail(fn, "steps", "None when `stepsize_controller` is given", steps)
        return diffrax.StepTo(ts=jnp.linspace(t0, t1, steps + 1, dtype=dtype)), steps
    max_steps = _checks.check_int(
        fn, "max_steps", _DEFAULT_MAX_STEPS if max_steps is None else max_steps
    )
    if stepsize_controller is None:
        if isinstance(slv, _FIXED_STEP):
            _checks.fail(
                fn,
                "steps",
                "given for the fixed-step solver "
                f"{type(slv).__name__} (or use an adaptive solver such as 'tsit5')",
                steps,
            )
        return diffrax.PIDController(rtol=rtol, atol=atol, norm=optimistix.max_norm), max_steps
    _checks.check_instance(
        fn,
        "stepsize_controller",
        stepsize_controller,
        diffrax.AbstractStepSizeController,
        "a diffrax step-size controller",
    )
    if isinstance(stepsize_controller, diffrax.StepTo):
        return stepsize_controller, len(stepsize_controller.ts) - 1
    if not isinstance(stepsize_controller, diffrax.AbstractAdaptiveStepSizeController):
        _checks.fail(
            fn,
            "stepsize_controller",
            "an adaptive controller or StepTo (for equal steps pass `steps`)",
            type(stepsize_controller).__name__,
        )
    if isinstance(slv, RK4) or not isinstance(slv, diffrax.AbstractAdaptiveSolver):
        _checks.fail(
            fn,
            "stepsize_controller",
            f"a fixed-step controller for the fixed-step solver "
            f"{type(slv).__name__} (pass `steps`)",
            type(stepsize_controller).__name__,
        )
    return stepsize_controller, max_steps


def _check_save_ts(fn: str, save_ts: Any, t0: float, t1: float) -> np.ndarray:
    if not _checks.is_concrete(save_ts):
        _checks.fail(fn, "save_ts", "a concrete 1-D array of times", "a traced value", TypeError)
    try:
        ts = np.asarray(save_ts, dtype=np.float64)
    except (TypeError, ValueError):
        _checks.fail(fn, "save_ts", "a 1-D array of times", save_ts, TypeError)
    if ts.ndim != 1 or ts.size < 1:
        _checks.fail(fn, "save_ts", "a non-empty 1-D array", f"shape {ts.shape}")
    lo, hi = min(t0, t1), max(t0, t1)
    if np.any(ts < lo) or np.any(ts > hi):
        _checks.fail(fn, "save_ts", f"between t0={t0:g} and t1={t1:g}", ts)
    if np.any(np.diff(ts) * np.sign(t1 - t0) <= 0):
        _checks.fail(fn, "save_ts", "strictly monotone from t0 towards t1", ts)
    return ts


def nfe(solver: diffrax.AbstractSolver, num_steps: Int[ArrayLike, ""]) -> Int[Array, ""]:
    """Vector-field evaluations made by diffrax for ``num_steps`` steps (accepted and rejected).

    Checked against a counting callback in tests/test_sample.py (diffrax's initial step-size
    guess for wrapped ODE terms costs no evaluation: it starts adaptive solves at dt0 = 0.01).
    """
    if isinstance(solver, diffrax.Euler):
        return jnp.asarray(num_steps)
    tab = solver.tableau
    if tab.fsal:  # the first stage of each step is the last of the previous one
        return 1 + (tab.num_stages - 1) * jnp.asarray(num_steps)  # +1: the first stage at t0
    return tab.num_stages * jnp.asarray(num_steps)


# ----------------------------------------------------------------------------- the solve


def check_result(
    fn: str,
    sol,
    y1,
    t0: float,
    t1: float,
    max_steps: int,
    schedule,
    cause: Callable[[str], tuple[str, str]] | None = None,
    where: tuple[float, float] | None = None,
) -> None:
    """Eagerly: a failed or non-finite solve becomes a ValueError naming the likely cause.

    Call it only on a concrete result (never under a trace). ``cause(what)``, called only for
    non-finite states of a successful solve (``what`` says which solve), may name the argument
    that made them, as ``(name, must_be)`` (``sample.sde`` probes its velocity, score and
    diffusion). ``where = (ta, tb)``: the field turned non-finite between ta and tb, inside the
    solve (``non_finite_time``): the velocity is named with that time. Otherwise the end time
    or the velocity is named.
    """
    finite = all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(y1))
    ok = sol.result == diffrax.RESULTS.successful
    if ok and finite:
        return
    steps_out = sol.result == diffrax.RESULTS.max_steps_reached
    if not ok:
        what = (
            f"hit max_steps={max_steps}" if steps_out else f"failed ({diffrax.RESULTS[sol.result]})"
        )
    else:
        what = "returned non-finite states"
    what = f"the solve from t0={t0:g} to t1={t1:g} {what}"
    if ok and cause is not None:
        name, must_be = cause(what)
        _checks.fail(fn, name, must_be, "non-finite")
    if where is not None:
        ta, tb = where
        at = f"t = {ta:.6g}" if ta == tb else f"a time between t = {ta:.6g} and {tb:.6g}"
        _checks.fail(fn, "velocity", f"finite along the solve ({what})", f"non-finite at {at}")
    if schedule is None:
        _checks.fail(
            fn,
            "t1",
            f"a time where the velocity is finite ({what}; a velocity singular at an end, "
            "e.g. of the vp schedule at t = 1, needs `schedule=` or a velocity with a `.schedule` "
            "so that t0/t1 default to its valid interval"
            + ("; or raise `max_steps`)" if steps_out and finite else ")"),
            t1,
        )
    if steps_out and finite:
        _checks.fail(fn, "max_steps", f"large enough ({what}; or loosen rtol/atol)", max_steps)
    interval = f"[{schedule.t_min:g}, {schedule.t_max:g}]"
    _checks.fail(fn, "velocity", f"finite on the valid interval {interval} ({what})", "non-finite")


def _finite(tree) -> bool:
    return all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(tree))


def non_finite_time(sol, y1, t0: float, t1: float, field, args, run) -> tuple[float, float] | None:
    """Eagerly, after a failed or non-finite solve: ``(ta, tb)``, the times between which the
    field ``field(t, y, args)`` turned non-finite inside the solve, or None (the solve is fine,
    the field stays finite, or it turns non-finite only at the end t1, a singular end).

    A failed adaptive solve stops where its steps kept being rejected (``sol.ts[-1]``, saved
    there by diffrax): the field is probed just past that state. A fixed-step solve with
    non-finite states is rerun saving every step (an error path: the cost does not matter)."""
    if sol.result == diffrax.RESULTS.successful:
        if _finite(y1):
            return None
        steps = run(saveat=diffrax.SaveAt(steps=True))
        ts = np.asarray(steps.ts, np.float64)
        bad = np.zeros(ts.shape, bool)
        for leaf in jax.tree.leaves(steps.ys):
            leaf = np.asarray(leaf)
            bad |= ~np.isfinite(leaf.reshape(leaf.shape[0], -1)).all(axis=1)
        bad &= np.isfinite(ts)  # unused step slots are padded with inf
        if not bad.any():
            return None
        i = int(np.argmax(bad))
        if ts[i] == t1:  # non-finite only on the last step: a singular end
            return None
        return (float(ts[i - 1]) if i > 0 else t0, float(ts[i]))
    t_stop = float(np.asarray(sol.ts)[-1])
    span = t1 - t_stop
    if abs(span) <= 1e-3 * max(abs(t1), 1.0):  # stopped at the end: a singular end
        return None
    for frac in (0.0, 1e-6, 1e-4, 1e-2):
        t = t_stop + frac * span
        dtype = jax.tree.leaves(y1)[0].dtype
        if not _finite(field(jnp.asarray(t, dtype), y1, args)):
            return (t, t)
    return None


def solve(
    fn: str,
    vector_field: Callable[[Array, PyTree, Any], PyTree],
    y0: PyTree,
    args: PyTree,
    *,
    solver: str | diffrax.AbstractSolver,
    stepsize_controller: diffrax.AbstractStepSizeController | None,
    steps: int | None,
    t0: float,
    t1: float,
    rtol: float,
    atol: float,
    save_ts: Float[ArrayLike, " T"] | None,
    max_steps: int | None,
    adjoint: diffrax.AbstractAdjoint | None,
    schedule: Schedule | None = None,
) -> Solved:
    """Validated diffrax solve of ``dy/dt = vector_field(t, y, args)`` from ``t0`` to ``t1``.

    ``t0``/``t1`` are checked concrete times (``resolve_times``). Eagerly (a concrete result), a
    failed or non-finite solve raises ``ValueError``; under a trace diffrax's own error applies.
    """
    slv = _resolve_solver(fn, solver)
    rtol = _checks.check_positive(fn, "rtol", rtol)
    atol = _checks.check_positive(fn, "atol", atol)
    # Times are Python floats, float64 under x64: the states follow them (float32 states on a
    # float64 clock would miss diffrax's step grid), as diffrax's adaptive solve does anyway.
    y0 = jax.tree.map(promote_to_clock, y0)
    dtype = jax.tree.leaves(y0)[0].dtype
    controller, cap = _controller(
        fn, slv, stepsize_controller, steps, t0, t1, rtol, atol, max_steps, dtype
    )
    if save_ts is None:
        saveat = diffrax.SaveAt(t1=True)
    else:
        saveat = diffrax.SaveAt(t1=True, ts=jnp.asarray(_check_save_ts(fn, save_ts, t0, t1), dtype))
    run = functools.partial(
        diffrax.diffeqsolve,
        diffrax.ODETerm(vector_field),
        slv,
        t0=t0,
        t1=t1,
        dt0=None,
        y0=y0,
        args=args,
        stepsize_controller=controller,
        max_steps=cap,
        adjoint=diffrax.RecursiveCheckpointAdjoint() if adjoint is None else adjoint,
        throw=False,
    )
    sol = run(saveat=saveat)
    y1 = jax.tree.map(lambda a: a[-1], sol.ys)
    # Under jit or vmap (traced result or states): diffrax's runtime error, as with throw=True.
    if sol.result.is_traced() or not _checks.is_concrete(y1):
        sol = sol.result.error_if(sol, sol.result != diffrax.RESULTS.successful)
        y1 = jax.tree.map(lambda a: a[-1], sol.ys)
    else:
        where = non_finite_time(sol, y1, t0, t1, vector_field, args, run)
        check_result(fn, sol, y1, t0, t1, cap, schedule, where=where)
    num_steps = sol.stats["num_steps"]
    count = nfe(slv, num_steps)
    if save_ts is None:
        return Solved(y1, None, None, count, num_steps)
    return Solved(y1, sol.ts[:-1], jax.tree.map(lambda a: a[:-1], sol.ys), count, num_steps)
