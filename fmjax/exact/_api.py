"""The public functions of ``fmjax.exact``: validation, dtype promotion, and the call of the kernel
that ``_plan`` chooses (see the package docstring)."""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from fmjax import _checks
from fmjax._typing import Precision
from fmjax.exact import _cholesky, _plan
from fmjax.exact._prepared import PreparedCoupling
from fmjax.mixtures import GaussianMixture, JointGaussianMixture
from fmjax.schedules import Schedule

_QUANTITIES = ("velocity", "log_prob", "score", "divergence", "jacobian")


class Evaluation(NamedTuple):
    """Result of ``evaluate``: each requested quantity, ``None`` for those not requested.

    Attributes:
        velocity: u_t(x), (..., d).
        log_prob: log p_t(x), (...).
        score: grad_x log p_t(x), (..., d).
        divergence: div u_t(x), (...).
        jacobian: grad_x u_t(x), (..., d, d), entry [i, j] = d u_i / d x_j.
    """

    velocity: Float[Array, "... d"] | None = None
    log_prob: Float[Array, "..."] | None = None
    score: Float[Array, "... d"] | None = None
    divergence: Float[Array, "..."] | None = None
    jacobian: Float[Array, "... d d"] | None = None


def _check_inputs(fn: str, c, sched, t, x):
    fn = f"exact.{fn}"
    _checks.check_instance(fn, "schedule", sched, Schedule, "an fmjax Schedule")
    if x.ndim < 1 or x.shape[-1] != c.dim:
        _checks.fail(fn, "x", f"of shape (..., d={c.dim})", f"shape {x.shape}")
    try:
        jnp.broadcast_shapes(t.shape, x.shape[:-1])
    except ValueError:
        _checks.fail(
            fn, "t", f"broadcastable against x.shape[:-1] = {x.shape[:-1]}", f"shape {t.shape}"
        )
    sched.check_times(fn, "t", t)


def _unwrap(fn: str, c) -> JointGaussianMixture:
    """The coupling of a coupling or of a ``PreparedCoupling``, checked."""
    _checks.check_instance(
        f"exact.{fn}", "coupling", c, (JointGaussianMixture, PreparedCoupling),
        "a JointGaussianMixture (fmjax.independent_coupling(p0, p1) joins two GaussianMixtures)"
        " or an exact.prepare(...) of one",
    )  # fmt: skip
    return c.coupling if isinstance(c, PreparedCoupling) else c


def _promote(fn: str, c, t, x):
    """Points, times and coupling in one float dtype (``jnp.result_type`` of the three): a
    float64 coupling with float32 points computes in float64, and a float32 prepared coupling
    with float64 points is factored anew in float64 (not its float32 factors cast)."""
    joint = _unwrap(fn, c)
    # Complex or half-precision points and times are refused (a cast would lose information).
    x = _checks.check_real_array(f"exact.{fn}", "x", x, joint.means.dtype)
    t = _checks.check_real_array(f"exact.{fn}", "t", t, x.dtype)
    dtype = jnp.result_type(joint.means, x, t)
    if isinstance(c, PreparedCoupling):
        c = c.astype(dtype)  # also refactors factors cast away from their dtype
    elif joint.means.dtype != dtype:
        c = jax.tree.map(lambda a: a.astype(dtype), c)
    return c, t.astype(dtype), x.astype(dtype)


def _run(fn, want: frozenset, c, sched, t, x, precision):
    """Validate, flatten the batch, and evaluate ``want`` on the points x (N, d) by the kernel
    that ``_plan.plan`` chooses from static facts only (its docstring is the table)."""
    _checks.check_precision(f"exact.{fn}", "precision", precision)
    c, t, x = _promote(fn, c, t, x)
    prepared = isinstance(c, PreparedCoupling)
    joint = c.coupling if prepared else c
    _check_inputs(fn, joint, sched, t, x)
    d = joint.dim
    batch = jnp.broadcast_shapes(t.shape, x.shape[:-1])
    xf = jnp.broadcast_to(x, batch + (d,)).reshape(-1, d)
    per_point = t.size > 1
    tf = jnp.broadcast_to(t, batch).reshape(-1) if per_point else t.reshape(())
    if prepared:
        structure = "independent" if c.independent else "map" if c.deterministic else "general"
        known = {True: "diagonal", False: "full", None: "unknown"}[c.noise_diagonal]
    else:
        structure, known = joint.structure, "unknown"
    kernel = _plan.plan(
        structure,
        prepared=prepared,
        noise=known if sched.has_noise else "none",
        times="per_point" if per_point else "shared",
        d=d,
        quantities=want,
        backend=_plan.backend(),
    )
    out = _plan.run(kernel, joint, c.factors if prepared else None, sched, tf, xf, want, precision)
    return {k: v.reshape(batch + v.shape[1:]) for k, v in out.items()}


def evaluate(
    coupling: JointGaussianMixture,
    schedule: Schedule,
    t: Float[ArrayLike, "..."],
    x: Float[ArrayLike, "... d"],
    quantities: tuple[str, ...] = ("velocity", "log_prob"),
    *,
    precision: Precision = "highest",
) -> Evaluation:
    """Several exact quantities in one pass over the components.

    Args:
        coupling: the joint mixture of (X0, X1), K components on R^{2d}, or its
            ``prepare(coupling)``.
        schedule: affine schedule (a_t, b_t).
        t: time(s) in the schedule's valid interval (``schedule.interval``), scalar or
            broadcastable against ``x.shape[:-1]``.
        x: points, shape (..., d).
        quantities: any of "velocity" (..., d), "log_prob" (...), "score" (..., d),
            "divergence" (...), "jacobian" (..., d, d). Static.
        precision: matmul precision (static); "highest" keeps float32 exact on GPUs (no TF32).

    Returns:
        ``Evaluation(velocity, log_prob, score, divergence, jacobian)`` with ``None`` for the
        quantities not requested.

    Raises:
        TypeError: for a coupling or schedule of the wrong type.
        ValueError: for bad ``quantities``, shapes, or concrete times outside the interval.
    """
    if isinstance(quantities, str) or not all(isinstance(q, str) for q in quantities):
        _checks.fail(
            "exact.evaluate", "quantities", f"a tuple of names from {_QUANTITIES}", quantities,
            TypeError,
        )  # fmt: skip
    want = frozenset(quantities)
    if not want or not want <= set(_QUANTITIES):
        _checks.fail(
            "exact.evaluate", "quantities", f"a non-empty subset of {_QUANTITIES}", quantities
        )
    return Evaluation(**_run("evaluate", want, coupling, schedule, t, x, precision))


def _one(name: str, coupling, schedule, t, x, precision) -> Array:
    return _run(name, frozenset({name}), coupling, schedule, t, x, precision)[name]


def velocity(
    coupling: JointGaussianMixture,
    schedule: Schedule,
    t: Float[ArrayLike, "..."],
    x: Float[ArrayLike, "... d"],
    *,
    precision: Precision = "highest",
) -> Float[Array, "... d"]:
    """Marginal velocity u_t(x) = E[dX_t/dt | X_t = x]; several quantities at once: ``evaluate``.

    Args:
        coupling: the joint mixture of (X0, X1), K components on R^{2d}, or its
            ``prepare(coupling)``.
        schedule: affine schedule (a_t, b_t).
        t: time(s) in ``schedule.interval``, scalar or broadcastable against ``x.shape[:-1]``.
        x: points, shape (..., d).
        precision: matmul precision (static); "highest" keeps float32 exact on GPUs (no TF32).

    Returns:
        (..., d): u_t(x).
    """
    return _one("velocity", coupling, schedule, t, x, precision)


def log_prob(
    coupling: JointGaussianMixture,
    schedule: Schedule,
    t: Float[ArrayLike, "..."],
    x: Float[ArrayLike, "... d"],
    *,
    precision: Precision = "highest",
) -> Float[Array, "..."]:
    """Log-density log p_t(x) of X_t; several quantities at once: ``evaluate``.

    Args:
        coupling: the joint mixture of (X0, X1), K components on R^{2d}, or its
            ``prepare(coupling)``.
        schedule: affine schedule (a_t, b_t).
        t: time(s) in ``schedule.interval``, scalar or broadcastable against ``x.shape[:-1]``.
        x: points, shape (..., d).
        precision: matmul precision (static); "highest" keeps float32 exact on GPUs (no TF32).

    Returns:
        (...): log p_t(x).
    """
    return _one("log_prob", coupling, schedule, t, x, precision)


def score(
    coupling: JointGaussianMixture,
    schedule: Schedule,
    t: Float[ArrayLike, "..."],
    x: Float[ArrayLike, "... d"],
    *,
    precision: Precision = "highest",
) -> Float[Array, "... d"]:
    """Score grad_x log p_t(x); several quantities at once: ``evaluate``.

    Args:
        coupling: the joint mixture of (X0, X1), K components on R^{2d}, or its
            ``prepare(coupling)``.
        schedule: affine schedule (a_t, b_t).
        t: time(s) in ``schedule.interval``, scalar or broadcastable against ``x.shape[:-1]``.
        x: points, shape (..., d).
        precision: matmul precision (static); "highest" keeps float32 exact on GPUs (no TF32).

    Returns:
        (..., d): the score.
    """
    return _one("score", coupling, schedule, t, x, precision)


def divergence(
    coupling: JointGaussianMixture,
    schedule: Schedule,
    t: Float[ArrayLike, "..."],
    x: Float[ArrayLike, "... d"],
    *,
    precision: Precision = "highest",
) -> Float[Array, "..."]:
    """Divergence of the marginal velocity, div u_t(x); several quantities at once: ``evaluate``.

    Args:
        coupling: the joint mixture of (X0, X1), K components on R^{2d}, or its
            ``prepare(coupling)``.
        schedule: affine schedule (a_t, b_t).
        t: time(s) in ``schedule.interval``, scalar or broadcastable against ``x.shape[:-1]``.
        x: points, shape (..., d).
        precision: matmul precision (static); "highest" keeps float32 exact on GPUs (no TF32).

    Returns:
        (...): div u_t(x), the trace of ``velocity_jacobian``.
    """
    return _one("divergence", coupling, schedule, t, x, precision)


def velocity_jacobian(
    coupling: JointGaussianMixture,
    schedule: Schedule,
    t: Float[ArrayLike, "..."],
    x: Float[ArrayLike, "... d"],
    *,
    precision: Precision = "highest",
) -> Float[Array, "... d d"]:
    """Jacobian of the marginal velocity, grad_x u_t(x): x (..., d) -> (..., d, d), entry
    [i, j] = d u_i / d x_j; its trace is ``divergence``. See ``evaluate``.

    In closed form, grad u = sum_k alpha_k grad v_k + sum_k alpha_k (v_k - u) (s_k - s)^T
    (grad v_k = C_k S_k^{-1}; folded centred, as the divergence).
    Args:
        coupling: the joint mixture of (X0, X1), K components on R^{2d}, or its
            ``prepare(coupling)``.
        schedule: affine schedule (a_t, b_t).
        t: time(s) in ``schedule.interval``, scalar or broadcastable against ``x.shape[:-1]``.
        x: points, shape (..., d).
        precision: matmul precision (static); "highest" keeps float32 exact on GPUs (no TF32).

    Returns:
        (..., d, d): the Jacobian, entry [..., i, j] = d u_i / d x_j.
    """
    want = frozenset({"jacobian"})
    return _run("velocity_jacobian", want, coupling, schedule, t, x, precision)["jacobian"]


def responsibilities(
    coupling: JointGaussianMixture,
    schedule: Schedule,
    t: Float[ArrayLike, "..."],
    x: Float[ArrayLike, "... d"],
    *,
    precision: Precision = "highest",
) -> Float[Array, "... K"]:
    """Posterior component probabilities P(K = k | X_t = x) (the responsibilities).

    Args:
        coupling: the joint mixture of (X0, X1), K components on R^{2d}, or its
            ``prepare(coupling)``.
        schedule: affine schedule (a_t, b_t).
        t: time(s) in ``schedule.interval``, scalar or broadcastable against ``x.shape[:-1]``.
        x: points, shape (..., d).
        precision: matmul precision (static); "highest" keeps float32 exact on GPUs (no TF32).

    Returns:
        (..., K): rows summing to 1.
    """
    want = frozenset({"responsibilities"})
    return _run("responsibilities", want, coupling, schedule, t, x, precision)["responsibilities"]


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["coupling"],
    meta_fields=["schedule", "precision"],
)
@dataclasses.dataclass(frozen=True)
class VelocityField:
    """The exact velocity of a coupling and schedule as a field ``(t, x) -> (..., d)``.

    A pytree (the coupling's arrays are leaves; schedule and precision are static), so a new
    field of same-shaped mixtures passes through ``jit`` without recompiling. ``schedule``
    tells samplers and metrics the valid interval of times.

    Attributes:
        coupling: the joint mixture of (X0, X1).
        schedule: the affine schedule.
        precision: matmul precision of the engine.
    """

    coupling: JointGaussianMixture | PreparedCoupling
    schedule: Schedule
    precision: Precision = "highest"

    def __call__(
        self, t: Float[ArrayLike, "..."], x: Float[ArrayLike, "... d"]
    ) -> Float[Array, "... d"]:
        """u_t(x), as ``velocity(coupling, schedule, t, x)``."""
        return velocity(self.coupling, self.schedule, t, x, precision=self.precision)


def velocity_field(
    coupling: JointGaussianMixture | PreparedCoupling,
    schedule: Schedule,
    *,
    precision: Precision = "highest",
) -> VelocityField:
    """The exact velocity as a field ``(t, x) -> (..., d)`` that knows its schedule.

    ``coupling`` may be an ``exact.prepare(...)``: the field then factors nothing per call.

    Args:
        coupling: the joint mixture of (X0, X1) or its ``prepare(coupling)``.
        schedule: affine schedule (static in the field).
        precision: matmul precision of the engine (static).

    Returns:
        a ``VelocityField`` (a pytree), callable as ``field(t, x)``.

    Raises:
        TypeError: for a coupling or schedule of the wrong type.
    """
    _unwrap("velocity_field", coupling)
    _checks.check_instance(
        "exact.velocity_field", "schedule", schedule, Schedule, "an fmjax Schedule"
    )
    return VelocityField(coupling, schedule, precision)


def marginal(
    coupling: JointGaussianMixture, schedule: Schedule, t: Float[ArrayLike, ""]
) -> GaussianMixture:
    """The law p_t of X_t at one scalar time t, as a K-component GaussianMixture on R^d.

    Args:
        coupling: the joint mixture of (X0, X1) or its ``prepare(coupling)``.
        schedule: affine schedule (a_t, b_t).
        t: one scalar time in ``schedule.interval``.

    Returns:
        the ``GaussianMixture`` of X_t (weights (K,), means (K, d), covariances (K, d, d)).
    """
    coupling = _unwrap("marginal", coupling)
    t = _checks.check_real_array("exact.marginal", "t", t, coupling.means.dtype)
    if t.ndim != 0:
        _checks.fail("exact.marginal", "t", "a scalar", f"shape {t.shape}")
    _check_inputs("marginal", coupling, schedule, t, coupling.means[:1, : coupling.dim])
    comps = _cholesky.comps(coupling)
    mu, _, cov, _ = _cholesky.path_blocks(comps, schedule, t.astype(coupling.means.dtype))
    return GaussianMixture._from_leaves(coupling.weights, mu, cov)
