"""SDE sampling with the marginals p_t of the flow: the velocity plus a score term and noise.

For an affine schedule x_t = b_t x0 + a_t x1 with Gaussian source x0 ~ N(0, I), the score follows
from the velocity, score_t(x) = (a_t u_t(x) - da_t x) / (b_t (da_t b_t - a_t db_t)), and for any
diffusion g(t) >= 0 the SDE

    dX = [u_t(X) + g(t)^2 / 2 * score_t(X)] dt + g(t) dW

has the same marginals p_t as the ODE dx/dt = u_t(x) (its Fokker-Planck equation reduces to the
continuity equation). The score is singular where b_t = 0 (the data end), so the SDE runs on
[t_min, t_max - eps] of the schedule's valid interval and one Euler step of the ODE (g = 0), the
denoising step, covers [t_max - eps, t_max].

With a score field given (``score=``, e.g. ``functools.partial(fmjax.exact.score, c, s)`` or one
learned by the "score" target of ``fmjax.losses``), nothing is derived: the SDE above holds for any
source, any coupling and stochastic interpolants (latent noise gamma_t z), with u the
probability-flow velocity. In the notation eps(t) = g(t)^2 / 2 of Albergo, Boffi &
Vanden-Eijnden, dX = [u + eps s] dt + sqrt(2 eps) dW. Without ``score=`` the derivation above is
used, valid only for an N(0, I) source and no latent noise: a schedule with noise, or an exact
field whose coupling has another source, is refused.

Default diffusion. Any g keeps the marginals in exact arithmetic, but with a learned velocity the
derived score's error is the velocity's error times a_t / (b_t (da_t b_t - a_t db_t)), unbounded
as b_t -> 0, and g^2 / 2 multiplies it into the drift: a constant g collapses the modes of a
learned field, the more so the more steps reach close to t_max. So ``diffusion=None`` (the
default) with the derived score is the vanishing diffusion

    g(t)^2 = 2 b_t (da_t b_t - a_t db_t),   g^2 / 2 * score = a_t u - da_t x,

which has no division at all: the velocity's error reaches the drift times at most 1 + a_t. It
does not depend on how time is parametrised (g^2 dt is invariant) and for the linear path reads
g(t)^2 = 2 (1 - t), drift (1 + t) u - x. The drift is computed in that form, finite up to t_max,
so ``eps=0`` (no denoising step) is allowed with it. The factor 2 mixes more than 1 and amplifies
less than 4: on the demo problem with a learned field (200 and 1000 steps), every mode's spread
stayed within about 5% of the target's with 2, against up to 13% off with 1 and 16% with 4.
With a given score (no 1 / b_t of the derivation to tame) the default stays the constant g = 1.
In reversed time the default is the same function of the forward time t = 1 - s.

Reversed time (data at s = 0, noise at s = 1): the velocity is v_s = dx/ds, the schedule reads
x_s = b_s x_data + a_s x_noise and g is a function of s. With t = 1 - s this is the forward
problem u_t(x) = -v_{1-t}(x), a_t = b_{1-t}, b_t = a_{1-t}, g(t) <- g(1 - t), on the flipped
interval, so both clocks give the same samples.
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

from fmjax import _checks, _solve, convert
from fmjax._typing import Velocity
from fmjax.schedules import Schedule

__all__ = ["SDE_SOLVERS", "SDESolution", "sde"]


# SDE solvers for additive noise (g depends on t only, so Ito = Stratonovich): Euler-Maruyama,
# Heun (strong order 1 for additive noise) and ShARK (strong order 1.5, uses space-time Levy area).
SDE_SOLVERS: dict[str, Callable[[], diffrax.AbstractSolver]] = {
    "euler": diffrax.Euler,
    "heun": diffrax.Heun,
    "shark": diffrax.ShARK,
}
_SOLVER_TYPES = "one of 'euler', 'heun', 'shark', or a diffrax Euler, Heun or stochastic RK solver"


def _sde_solver(fn: str, solver) -> tuple[diffrax.AbstractSolver, type, int]:
    """``(solver object, Levy area its Brownian path must carry, drift evaluations per step)``
    for a name of ``SDE_SOLVERS`` or a diffrax solver object (Euler, Heun, or a stochastic
    Runge-Kutta solver such as ``diffrax.ShARK()``: one drift evaluation per stage)."""
    if isinstance(solver, str):
        name = _checks.check_choice(fn, "solver", solver, tuple(SDE_SOLVERS))
        solver = SDE_SOLVERS[name]()
    if isinstance(solver, diffrax.Euler | diffrax.Heun):
        return solver, diffrax.BrownianIncrement, 1 if isinstance(solver, diffrax.Euler) else 2
    if isinstance(solver, diffrax.AbstractSRK):
        levy = solver.minimal_levy_area
        if issubclass(levy, diffrax.AbstractSpaceTimeTimeLevyArea):
            levy = diffrax.SpaceTimeTimeLevyArea
        elif issubclass(levy, diffrax.AbstractSpaceTimeLevyArea):
            levy = diffrax.SpaceTimeLevyArea
        else:
            levy = diffrax.BrownianIncrement
        return solver, levy, len(solver.tableau.c) + 1
    _checks.fail(fn, "solver", _SOLVER_TYPES, type(solver).__name__, TypeError)


class SDESolution(NamedTuple):
    """Result of ``sde``.

    Attributes:
        x: samples at the data end (t_max, or s = 1 - t_max in reversed time), shape of ``x0``.
        ts: the step grid in the caller's clock (steps + 1,), if ``save_trajectory``, else None.
        xs: states on that grid, (steps + 1, ..., d), or None.
        nfe: number of (batched) velocity evaluations, int scalar.
        num_steps: number of steps, the denoising step included, int scalar.
    """

    x: Float[Array, "... d"]
    ts: Float[Array, " T"] | None
    xs: Float[Array, "T ... d"] | None
    nfe: Int[Array, ""]
    num_steps: Int[Array, ""]


# ----------------------------------------------------------------------------- reversed clock


def _flipped_coeffs(t, schedule):
    a, b, da, db = schedule(1.0 - t)
    return b, a, -db, -da


def _flip_schedule(schedule: Schedule) -> Schedule:
    """Forward-clock schedule of a reversed-time one: x_t = x_{s=1-t}, on the flipped interval."""
    interval = (1.0 - schedule.t_max, 1.0 - schedule.t_min)
    return Schedule(f"flip({schedule.name})", _flipped_coeffs, (schedule,), interval)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["velocity"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class _Flipped:
    """Forward-clock velocity u_t(x) = -v_{1-t}(x) of a reversed-time velocity v."""

    velocity: Velocity

    def __call__(self, t, x):
        return -self.velocity(1.0 - t, x)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["score"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class _FlippedScore:
    """Forward-clock score s_t(x) = s_{1-t}(x) of a reversed-time score (no sign change)."""

    score: Callable

    def __call__(self, t, x):
        return self.score(1.0 - t, x)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["g"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class _FlipG:
    """Diffusion coefficient in the forward clock: g_fwd(t) = g(1 - t)."""

    g: Callable

    def __call__(self, t):
        return self.g(1.0 - t)


# ----------------------------------------------------------------------------- diffusion


@functools.partial(jax.tree_util.register_dataclass, data_fields=["value"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class _Constant:
    """g(t) = value; the value is a pytree leaf, so a new constant does not recompile."""

    value: Array

    def __call__(self, t):
        return jnp.broadcast_to(self.value, jnp.shape(t)).astype(jnp.result_type(t))


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=[], meta_fields=["schedule", "scale"]
)
@dataclasses.dataclass(frozen=True)
class _Vanishing:
    """g(t)^2 = scale * b_t (da_t b_t - a_t db_t) (forward clock): with the derived score,
    g^2 / 2 * score = scale / 2 * (a_t u - da_t x), free of the 1 / b_t singularity."""

    schedule: Schedule
    scale: float  # static, like the schedule: a Python float keeps the dtype of x

    def __call__(self, t):
        a, b, da, db = self.schedule(t)
        g2 = self.scale * b * (da * b - a * db)
        return jnp.sqrt(jnp.maximum(g2, 0.0)).astype(jnp.result_type(t))


# The default diffusion with a given score (no derivation, nothing singular to compensate).
_GIVEN_SCORE_DIFFUSION = 1.0
# Scale of ``_Vanishing``, the default with the derived score: g^2 / 2 * score = a u - da x.
_VANISHING_SCALE = 2.0


def _as_diffusion(fn: str, diffusion) -> Callable[[Array], Array]:
    """A callable g; a number becomes ``_Constant`` (checked >= 0 when concrete)."""
    if callable(diffusion):
        return diffusion
    if isinstance(diffusion, jax.Array) and not _checks.is_concrete(diffusion):
        if diffusion.ndim != 0:
            _checks.fail(fn, "diffusion", "a scalar", f"shape {diffusion.shape}", TypeError)
        return _Constant(diffusion)
    if isinstance(diffusion, bool) or not isinstance(diffusion, int | float | np.number | Array):
        what = "a number >= 0 or a callable t -> g(t)"
        _checks.fail(fn, "diffusion", what, diffusion, TypeError)
    g = _checks.check_positive(fn, "diffusion", diffusion, allow_zero=True)
    return _Constant(jnp.asarray(g))


def _check_diffusion(
    fn: str, g, eps: float, interval: tuple[float, float], *inputs, derived: bool = True
) -> None:
    """g must be finite, >= 0 and scalar on the interval, and vanish at its end when eps = 0
    (only for the derived score, singular there; a given score is the caller's to judge).

    Runs only when everything is concrete (never under a trace): a probe of g on 33 times.
    """
    if not _checks.is_concrete(g, *inputs):
        return
    probe = np.linspace(*interval, 33)
    try:
        vals = jax.vmap(g)(jnp.asarray(probe))
    except Exception as e:  # noqa: BLE001 - report any failure of a user callable
        got = f"{type(e).__name__}: {e}"
        _checks.fail(fn, "diffusion", "a callable of scalar times t -> g(t)", got)
    if not _checks.is_concrete(vals):
        return
    vals = np.asarray(vals, dtype=np.float64)
    where = f"[{interval[0]:g}, {interval[1]:g}]"
    if vals.shape != probe.shape:
        _checks.fail(fn, "diffusion", "a scalar g(t)", f"shape {vals.shape[1:]}")
    if not np.all(np.isfinite(vals) & (vals >= 0)):
        bad = float(vals[~(np.isfinite(vals) & (vals >= 0))][0])
        _checks.fail(fn, "diffusion", f"finite and >= 0 on {where}", bad)
    if derived and eps == 0 and vals[-1] != 0:
        _checks.fail(
            fn,
            "diffusion",
            f"0 at t={interval[1]:g} with eps=0 (the score is singular at the "
            "data end; use eps > 0, the default)",
            float(vals[-1]),
        )


# ----------------------------------------------------------------------------- the solve


class _SDEArgs(NamedTuple):
    velocity: Velocity
    schedule: Schedule
    diffusion: Callable
    score: Callable | None


def _sde_drift(t, x, args: _SDEArgs):
    u = _solve.check_output("sample.sde", "velocity", args.velocity(t, x), x)
    if args.score is None and isinstance(args.diffusion, _Vanishing):
        # g^2 / 2 * score with the 1 / (b (da b - a db)) of the score cancelled: no singularity.
        a, _, da, _ = args.schedule(t)
        return u + 0.5 * args.diffusion.scale * (a * u - da * x)
    g = args.diffusion(t)
    g2 = g * g
    if args.score is None:
        s = convert.velocity_to_score(args.schedule, t, x, u)
    else:
        s = _solve.check_output("sample.sde", "score", args.score(t, x), x)
    # Where g = 0 (e.g. g(t_max) = 0 with eps = 0) drop the score term: it may be inf there.
    return jnp.where(g2 > 0, u + 0.5 * g2 * s, u)


def _sde_diffusion(t, x, args: _SDEArgs):
    return lineax.DiagonalLinearOperator(jnp.broadcast_to(args.diffusion(t), x.shape))


def _brownian(levy: type, brownian: str, t0: float, t1: float, n: int, x0: Array, key):
    shape = jax.ShapeDtypeStruct(x0.shape, x0.dtype)
    if brownian == "virtual":
        tol = 0.25 * (t1 - t0) / n
        return diffrax.VirtualBrownianTree(t0, t1, tol=tol, shape=shape, key=key, levy_area=levy)
    return diffrax.UnsafeBrownianPath(shape=shape, key=key, levy_area=levy)


def _solve_sde(solver, brownian, args: _SDEArgs, x0, key, t0, t1, n, save_trajectory: bool):
    """``solver = (diffrax solver, Levy area)`` (Euler-Maruyama, Heun, ShARK, ...) on n equal
    steps from t0 to t1."""
    solver, levy = solver
    grid = jnp.linspace(t0, t1, n + 1, dtype=x0.dtype)
    bm = _brownian(levy, brownian, t0, t1, n, x0, key)
    terms = diffrax.MultiTerm(diffrax.ODETerm(_sde_drift), diffrax.ControlTerm(_sde_diffusion, bm))
    saveat = diffrax.SaveAt(t0=True, steps=True) if save_trajectory else diffrax.SaveAt(t1=True)
    return diffrax.diffeqsolve(
        terms,
        solver,
        t0=t0,
        t1=t1,
        dt0=None,
        y0=x0,
        args=args,
        saveat=saveat,
        stepsize_controller=diffrax.StepTo(ts=grid),
        max_steps=n,
        # UnsafeBrownianPath cannot be replayed for a backward pass: forward-mode autodiff only.
        adjoint=diffrax.ForwardMode()
        if brownian == "unsafe"
        else diffrax.RecursiveCheckpointAdjoint(),
    )


def _check_eps(fn: str, eps, steps: int, interval: tuple[float, float]) -> float:
    length = interval[1] - interval[0]
    if eps is None:
        if steps < 2:
            _checks.fail(
                fn,
                "steps",
                ">= 2 (one SDE step and the denoising step; eps=0 allows steps=1)",
                steps,
            )
        return length / steps
    eps = _checks.check_positive(fn, "eps", eps, allow_zero=True)
    if eps >= length:
        _checks.fail(fn, "eps", f"in [0, {length:g}), below the length of the valid interval", eps)
    if eps > 0 and steps < 2:
        _checks.fail(fn, "steps", ">= 2 with eps > 0 (one SDE step and the denoising step)", steps)
    return eps


def sde(
    velocity: Velocity,
    schedule: Schedule,
    x0: Float[ArrayLike, "... d"],
    *,
    key: PRNGKeyArray,
    diffusion: float | Callable[[Array], Array] | None = None,
    steps: int = 100,
    solver: str | diffrax.AbstractSolver = "euler",
    eps: float | None = None,
    brownian: str = "virtual",
    time: str = "forward",
    save_trajectory: bool = False,
    score: Velocity | None = None,
) -> SDESolution:
    """Sample with the Ito SDE dX = [u + g^2/2 score] dt + g dW, which keeps the marginals p_t.

    With ``score=`` any source and any (stochastic) interpolant works: eps(t) = g(t)^2 / 2 in
    the notation dX = [u + eps s] dt + sqrt(2 eps) dW. Without it the score comes from the
    velocity, s = (a_t u - da_t x) / (b_t (da_t b_t - a_t db_t)), valid only for Gaussian
    x0 ~ N(0, I), no latent noise, and the affine ``schedule`` the velocity was built with; a
    schedule with noise, or an exact field
    (``exact.velocity_field`` or ``partial(exact.velocity, coupling, ...)``) whose coupling's
    source is not an independent N(0, I), raises. ``diffusion = 0`` gives the ODE. Works under
    an outer ``jax.jit`` and ``jax.vmap`` (over ``x0`` and ``key``); the diffusion is checked only
    when it can be evaluated concretely.

    Args:
        velocity: ``(t, x) -> (..., d)`` (in the caller's clock, see ``time``); with noise the
            probability-flow velocity (``exact.velocity``, or ``convert.drift_to_velocity`` of a
            learned drift and score).
        schedule: the affine schedule of the velocity; its valid interval [t_min, t_max] is the
            time span of the solve.
        x0: source samples at t_min, shape (..., d) (from N(0, I) unless ``score`` is given).
        key: PRNG key of the Brownian motion (keyword-only).
        diffusion: g(t) >= 0, a number or an elementwise callable of the caller's time
            (eps(t) = g(t)^2 / 2; upstream's eps = 2 is ``diffusion=2.0``). Default (None):
            with the derived score g(t)^2 = 2 b_t (da_t b_t - a_t db_t) (in the forward clock;
            2 (1 - t) for the linear path), which vanishes at the data end so that the score's
            1 / b_t does not amplify a learned velocity's error into the drift (a constant g
            collapses the modes of a learned field; any g keeps the marginals of the exact
            one); with ``score=`` the constant 1.
        steps: total number of equal steps, including the final denoising ODE step.
        solver: "euler" (Euler-Maruyama), "heun" or "shark" (higher order for additive noise),
            or a diffrax solver object: ``diffrax.Euler()``, ``diffrax.Heun()`` or a stochastic
            Runge-Kutta solver such as ``diffrax.ShARK()`` or ``diffrax.SRA1()`` (the Brownian
            path then carries the Levy area the solver needs; one drift evaluation per stage).
        eps: the SDE runs on [t_min, t_max - eps], then one Euler ODE step covers the rest.
            Default (t_max - t_min) / steps (the last step of the grid); 0 requires g(t_max) = 0
            (no denoising step), or the default diffusion.
        brownian: "virtual" (``diffrax.VirtualBrownianTree``) or "unsafe"
            (``diffrax.UnsafeBrownianPath``, faster, fixed forward steps only). Different paths.
        time: "forward" (t = 0 noise, t = 1 data) or "reversed" (s = 0 data, s = 1 noise;
            the velocity is dx/ds and the schedule reads x_s = b_s x_data + a_s x_noise).
        save_trajectory: also return the states on the step grid.
        score: the score grad log p_t, ``(t, x) -> (..., d)`` in the caller's clock (exact, e.g.
            ``functools.partial(fmjax.exact.score, coupling, schedule)``, or learned). With a
            score, ``eps=0`` is allowed for any g (the score must then be finite at t_max).

    Returns:
        ``SDESolution(x, ts, xs, nfe, num_steps)``.

    Raises:
        TypeError: for a velocity, schedule, key or diffusion of the wrong type.
        ValueError: naming the argument, for bad solver, steps, eps, diffrax or shapes; and,
            eagerly (never under a trace), for non-finite samples, as ``sample.ode``: naming
            the velocity, score or diffusion that is non-finite at the last finite state (or
            ``steps`` when all three are finite there: the step overflowed), and the step.
            Found on failure only, by a rerun that saves the trajectory (same key, same path).
    """
    fn = "sample.sde"
    _checks.check_callable(fn, "velocity", velocity, "a callable (t, x) -> (..., d)")
    _checks.check_instance(fn, "schedule", schedule, Schedule, "an fmjax Schedule")
    x0 = _solve.check_x(fn, x0)
    _solve.check_field(fn, "velocity", velocity, x0)
    # Times are Python floats, float64 under x64: the states follow them (as in sample.ode,
    # whose diffrax solve promotes), else diffrax's float64 t0 misses the float32 step grid.
    x0 = _solve.promote_to_clock(x0)
    x0, bad = _solve.finite_rows(fn, "x0", x0, "sample")
    key = _checks.check_key(fn, "key", key)
    solver, levy, drift_evals = _sde_solver(fn, solver)
    steps = _checks.check_int(fn, "steps", steps)
    _checks.check_choice(fn, "brownian", brownian, ("virtual", "unsafe"))
    _checks.check_choice(fn, "time", time, ("forward", "reversed"))
    if score is None:
        _check_derived_score(fn, schedule, velocity, time)
    else:
        _solve.check_field(fn, "score", score, x0)
        score = _solve.as_pytree(score)
    if diffusion is None and score is not None:
        diffusion = _GIVEN_SCORE_DIFFUSION
    g = None if diffusion is None else _solve.as_pytree(_as_diffusion(fn, diffusion))
    velocity = _solve.as_pytree(velocity)
    given = schedule
    if time == "reversed":
        velocity, schedule = _Flipped(velocity), _flip_schedule(schedule)
        g = None if g is None else _FlipG(g)
        score = None if score is None else _FlippedScore(score)
    if g is None:  # built in the forward clock, on the (flipped) schedule
        g = _Vanishing(schedule, _VANISHING_SCALE)
    eps = _check_eps(fn, eps, steps, schedule.interval)
    singular = score is None and not isinstance(g, _Vanishing)  # the 1 / b_t of the score
    _check_diffusion(fn, g, eps, schedule.interval, x0, key, velocity, derived=singular)

    t_min, t_max = schedule.interval
    n_sde = steps - 1 if eps > 0 else steps
    # The coefficients at the step times (a singular time between construction-grid points).
    grid = np.linspace(t_min, t_max - eps, n_sde + 1)
    what = "finite, with a_t, b_t, gamma_t not all zero, at the SDE's step times"
    given.check_coefficients(fn, "schedule", 1.0 - grid if time == "reversed" else grid, what)
    args = _SDEArgs(velocity, schedule, g, score)
    run = functools.partial(_solve_sde, (solver, levy), brownian, args, x0, key, t_min, t_max - eps)
    sol = run(n_sde, save_trajectory)
    x, num_steps = sol.ys[-1], sol.stats["num_steps"]
    nfe = drift_evals * num_steps
    if eps > 0:  # denoising step: Euler step of the probability-flow ODE to t_max
        x = x + eps * velocity(jnp.asarray(t_max - eps, x0.dtype), x)
        nfe, num_steps = nfe + 1, num_steps + 1
    if _checks.is_concrete(x):  # eagerly, like sample.ode: non-finite samples raise
        clock = (lambda t: 1.0 - t) if time == "reversed" else (lambda t: t)
        saved = sol.ys if save_trajectory else None
        cause = functools.partial(_cause, run, args, x0, x, saved, eps, n_sde, clock)
        _solve.check_result(fn, sol, x, clock(t_min), clock(t_max), steps, None, cause)
    if not save_trajectory:
        return SDESolution(_solve.mask_rows(bad, x), None, None, nfe, num_steps)
    ts, xs = _trajectory(sol, x, eps, t_min, t_max, n_sde, time)
    return SDESolution(_solve.mask_rows(bad, x), ts, _solve.mask_rows(bad, xs), nfe, num_steps)


def _cause(run, args: _SDEArgs, x0, x, saved, eps, n_sde, clock, what) -> tuple[str, str]:
    """``(name, must_be)`` for non-finite samples: the first step whose end state is not finite,
    and which of velocity, score and diffusion is non-finite at the last finite state (at both
    ends of that step), else ``steps`` (the step itself overflowed). Runs only on failure: the
    states on the step grid come from a rerun with the trajectory (same key, same path) unless
    it was saved."""
    xs = run(n_sde, True).ys if saved is None else saved
    t0, t1 = run.args[-2:]  # the SDE's interval [t_min, t_max - eps], forward clock
    ts = np.linspace(t0, t1, n_sde + 1)
    if eps > 0:  # the denoising step (probability-flow ODE, the velocity only)
        xs = jnp.concatenate([xs, x[None]], axis=0)
        ts = np.append(ts, ts[-1] + eps)
    finite = np.asarray(jnp.isfinite(xs).reshape(len(xs), -1).all(axis=1))
    k = int(np.argmin(finite))  # the first non-finite state (one exists)
    if k == 0:
        return "x0", f"finite ({what})"
    denoise = eps > 0 and k == len(ts) - 1
    ta, tb = clock(ts[k - 1]), clock(ts[k])
    step = (
        f"the denoising step of {len(ts) - 1}, t in [{ta:g}, {tb:g}]"
        if denoise
        else f"step {k} of {len(ts) - 1}, t in [{ta:g}, {tb:g}]"
    )
    xk = xs[k - 1]
    times = [jnp.asarray(t, x0.dtype) for t in ((ts[k - 1],) if denoise else ts[k - 1 : k + 1])]
    fields = {"velocity": lambda t: args.velocity(t, xk)}
    if not denoise and args.score is not None:
        fields["score"] = lambda t: args.score(t, xk)
    if not denoise:
        fields["diffusion"] = args.diffusion
    bad = [n for n, f in fields.items() if not all(bool(jnp.isfinite(f(t)).all()) for t in times)]
    where = f"the SDE's states became non-finite in {step}"
    if bad:
        also = f"; also non-finite: {', '.join(bad[1:])}" if len(bad) > 1 else ""
        last = f"the {bad[0]} is non-finite at the last finite state{also}"
        return bad[0], f"finite on the states it meets ({where}; {last})"
    return "steps", (
        f"large enough for a stable solve ({where}, with velocity, score and diffusion finite "
        "at the last finite state: the step overflowed; take more steps or a smaller diffusion)"
    )


def _exact_coupling(velocity):
    """The coupling behind an exact velocity field or partial of exact.velocity, else None."""
    from fmjax import exact  # the sampler does not otherwise depend on the engine

    c = None
    if isinstance(velocity, exact.VelocityField):
        c = velocity.coupling
    elif isinstance(velocity, functools.partial | jax.tree_util.Partial):
        if velocity.func is exact.velocity and velocity.args:
            c = velocity.args[0]
    if isinstance(c, exact.PreparedCoupling):
        c = c.coupling
    return c


def _check_derived_score(fn: str, schedule: Schedule, velocity, time: str) -> None:
    """Refuse the score-from-velocity derivation where it is known to be wrong."""
    ask = "given (score=(t, x) -> grad log p_t, e.g. partial(fmjax.exact.score, c, schedule))"
    if schedule.has_noise:
        _checks.fail(fn, "score", f"{ask}: with latent noise ({schedule.name}) the score does "
                     "not follow from the velocity", None)  # fmt: skip
    c = _exact_coupling(velocity)
    if c is None or not _checks.is_concrete(c.means, c.covs):
        return
    if not c.is_standard_normal(0 if time == "forward" else 1):  # reversed: the noise is "x1"
        _checks.fail(fn, "score", f"{ask}: the exact field's source is not an independent "
                     "N(0, I), so the score does not follow from the velocity", None)  # fmt: skip


def _trajectory(sol, x, eps, t_min, t_max, n_sde, time):
    """Step grid in the caller's clock and the states on it, the denoised end included."""
    ts = jnp.linspace(t_min, t_max - eps, n_sde + 1, dtype=x.dtype)
    xs = sol.ys
    if eps > 0:
        ts = jnp.concatenate([ts, jnp.full((1,), t_max, x.dtype)])
        xs = jnp.concatenate([xs, x[None]], axis=0)
    return (1.0 - ts if time == "reversed" else ts), xs
