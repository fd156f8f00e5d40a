"""Closed-form probability path of a Gaussian-mixture coupling: p_t, u_t, score, divergence.

For a joint mixture of (X0, X1) and a schedule, each component k makes (X_t, dX_t/dt) jointly
Gaussian, so p_t is a K-component Gaussian mixture and u_t(x) = E[dX_t | X_t = x] is a
responsibility-weighted sum of affine fields, all in closed form. A schedule with latent noise
(``schedule.noise``: x_t = b x0 + a x1 + gamma z, z ~ N(0, I) independent of the coupling) adds
gamma^2 I to each component's covariance and gamma dgamma I to Cov(dX_t, X_t) (only the
product, finite at t = 0, 1 where dgamma may not be): u_t is then the probability-flow drift
E[dX_t | X_t = x], the dgamma z part included, and ``marginal`` includes the gamma^2 I.

Public functions take ``(coupling, schedule, t, x)`` with ``x`` of shape (..., d) and ``t`` a
scalar or an array broadcastable against ``x.shape[:-1]``. They are pure and jit-compatible
(traced ``t`` and ``x``; ``precision`` is static), e.g. ``jax.jit(fmjax.exact.velocity)`` or
``functools.partial(fmjax.exact.velocity, coupling, schedule)`` as a velocity field ``(t, x)``.
Components are streamed in blocks with an online log-sum-exp: memory O(N d + B d^2).

Paths (kernels in ``fmjax._kernels``, ``fmjax._lowdim`` and ``fmjax._pencil``):
- per-time Cholesky: with one scalar ``t`` the K factors are computed once for all points; with
  one ``t`` per point they are computed per point (K d^3 work each, vmapped).
- low dimension, one scalar ``t``, d <= 8, velocity / log p / score (any coupling, prepared
  or not): ``_lowdim`` forms the whitened coordinates of all components in one product and the
  weighted sums in a second, with no short reductions over the components (which XLA:CPU runs
  as scalar loops): 3.6-6.7x faster than the per-time kernel at d = 2 on a 2-core CPU, 6x for
  ODE sampling with a prepared coupling at d = 2. With one ``t`` per point on a prepared
  independent coupling the time-free factors below are laid out the same way. The divergence
  takes the kernels below.
- on the CPU, for d > 8 and many points, the shared-t kernels take the points in chunks whose
  (n_c, B, d) terms stay in cache (``_kernels._plan``): 2x (per-time) to 4x (time-free) at
  d = 64, K = 64, N = 5e4. A GPU takes the whole batch.
- time-free, for independent couplings (S01 = S10 = 0 in every component, e.g. every
  ``independent_coupling``): a generalised eigendecomposition of (S11, S00) per component,
  once per coupling, turns every t into diagonal scalings between two fixed large products, so
  one t per point costs about what one shared t does. ``prepare(coupling)`` computes it once
  and returns a ``PreparedCoupling``, a pytree accepted everywhere in place of the coupling
  (also under jit and vmap), so an ODE solve with ``velocity_field(prepare(c), s)`` factors
  nothing per step (at d <= 8 the low-dimension kernel factors K d x d matrices per step
  instead, which costs less there). Without ``prepare``, a concrete independent coupling
  evaluated with one t per point is factored at call time; a traced coupling keeps the
  per-time path.
- time-free, for deterministic couplings x1 = m1 + A (x0 - m0) in every component with A
  symmetric positive-definite (Gaussian OT maps; singular joint covariance): X_t - mu_t =
  (b I + a A)(x0 - m0), so with A = Q diag(l) Q^T the velocity is
  dmu_t + Q diag((db + da l) / (b + a l)) Q^T (x - mu_t) and S_t = (bI + aA) S00 (bI + aA):
  x @ Q once, per-point diagonal scalings, a fixed d x d product per component. Detected by
  ``prepare`` (and at call time, as above); schedules with noise take the per-time path.
- general joint couplings with one t per point: no time-free form exists; per point K
  Cholesky factorisations of size d (K d^3 / 3 flops per point). For d <= 8 they are written as
  d vectorised right-looking steps over all (point, component) pairs at once (no per-matrix
  call; about 8x faster than batched LAPACK at d = 2, K = 8, N = 2e4 on a 2-core CPU); above,
  the shared-t kernel is vmapped over points (batched LAPACK calls of size d), which was as fast
  or faster there.

Which cases keep the time-free form with latent noise: in the pencil basis V (V^T S00 V = I,
V^T S11 V = diag(lam)) the noise adds gamma^2 V^T V, which stays diagonal iff V^T V is
diagonal. ``prepare`` checks this per coupling (to max(1e-10, 1e3 eps) relative; flag
``PreparedCoupling.noise_diagonal``). It holds when in every component S00 is a multiple of I
(a standard normal or any isotropic source), or S11 is a multiple of I (an isotropic target),
or more generally S00 and S11 commute with distinct generalised eigenvalues. Other independent
couplings take the per-time path for schedules with noise (correct, K d^3 per distinct time)
and keep the time-free path for schedules without.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from fmjax import _checks, _kernels, _lowdim, _pencil
from fmjax._typing import Precision
from fmjax.mixtures import GaussianMixture, JointGaussianMixture, structure_of
from fmjax.schedules import Schedule

__all__ = [
    "Evaluation",
    "PreparedCoupling",
    "prepare",
    "VelocityField",
    "velocity",
    "velocity_field",
    "log_prob",
    "score",
    "responsibilities",
    "divergence",
    "evaluate",
    "marginal",
]

_QUANTITIES = ("velocity", "log_prob", "score", "divergence")


class Evaluation(NamedTuple):
    """Result of ``evaluate``: each requested quantity, ``None`` for those not requested.

    Attributes:
        velocity: u_t(x), (..., d).
        log_prob: log p_t(x), (...).
        score: grad_x log p_t(x), (..., d).
        divergence: div u_t(x), (...).
    """

    velocity: Float[Array, "... d"] | None = None
    log_prob: Float[Array, "..."] | None = None
    score: Float[Array, "... d"] | None = None
    divergence: Float[Array, "..."] | None = None


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["coupling", "factors"],
    meta_fields=["independent", "noise_diagonal", "deterministic"],
)
@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity, as the mixtures are
class PreparedCoupling:
    """A coupling with its time-free factorisation, made by ``prepare``.

    A pytree (the coupling's and the factors' arrays are leaves, the flags are static),
    accepted by every ``exact`` function in place of the coupling and passing through ``jit``
    and ``vmap``.

    Attributes:
        coupling: the joint mixture of (X0, X1).
        factors: the per-component time-free factors (private layout), ``None`` when the
            coupling is neither independent nor deterministic.
        independent: whether the time-free path of an independent coupling is taken (static).
        noise_diagonal: whether V^T V is diagonal in every component, so that schedules with
            latent noise keep the time-free path too (static; otherwise they take the
            per-time path).
        deterministic: whether the time-free path of a deterministic coupling
            x1 = m1 + A (x0 - m0), A symmetric positive-definite, is taken (static; schedules
            with latent noise take the per-time path).
    """

    coupling: JointGaussianMixture
    factors: _pencil._Pencil | _pencil._Map | None
    independent: bool
    noise_diagonal: bool = False
    deterministic: bool = False

    @property
    def dim(self) -> int:
        """Dimension d of each of X0 and X1."""
        return self.coupling.dim

    @property
    def n_components(self) -> int:
        """Number of components K."""
        return self.coupling.n_components


def prepare(
    coupling: JointGaussianMixture,
    *,
    independent: bool | None = None,
    noise_diagonal: bool | None = None,
    deterministic: bool | None = None,
) -> PreparedCoupling:
    """Factor a coupling once for all times: pass the result wherever a coupling is taken.

    For an independent coupling (S01 = S10 = 0 in every component) the factorisation is
    time-free (see the module docstring): any pattern of times, one shared or one per point,
    then costs two large matrix products per block of components and no factorisation. With a
    schedule that carries latent noise this holds when V^T V is diagonal (e.g. an isotropic
    source or target in every component); otherwise such schedules take the per-time path.
    A deterministic coupling x1 = m1 + A (x0 - m0) in every component, A symmetric
    positive-definite (a Gaussian optimal-transport map; the joint covariance is singular), is
    time-free too, through the eigendecomposition of A (schedules without noise). Other
    couplings are wrapped as they are and keep the per-time Cholesky path.

    Args:
        coupling: the joint mixture of (X0, X1).
        independent: ``None`` (default) detects independence on a concrete coupling (a traced
            one is taken as not independent); ``True`` or ``False`` decides without looking,
            e.g. under ``jit``. ``True`` on a coupling with cross-covariance drops it (wrong
            answers).
        noise_diagonal: ``None`` (default) checks on concrete factors whether V^T V is
            diagonal (traced ones: taken as not); ``True`` or ``False`` decides without
            looking. ``True`` when it is not diagonal drops its off-diagonal part in schedules
            with noise (wrong answers).
        deterministic: ``None`` (default) detects a deterministic coupling on a concrete,
            non-independent one (A = S10 S00^{-1} symmetric positive-definite and
            S11 = A S00 A to max(1e-10, 1e3 eps) relative); ``True`` or ``False`` decides
            without looking (``True`` on another coupling gives wrong answers).

    Returns:
        A ``PreparedCoupling``.

    Raises:
        TypeError: for a coupling of the wrong type or a non-bool flag.
    """
    _checks.check_instance(
        "exact.prepare", "coupling", coupling, JointGaussianMixture, "a JointGaussianMixture"
    )
    flags = {"independent": independent, "noise_diagonal": noise_diagonal}
    for name, flag in {**flags, "deterministic": deterministic}.items():
        if flag is not None and not isinstance(flag, bool):
            _checks.fail("exact.prepare", name, "None, True or False", flag, TypeError)
    structure = _structure(coupling)
    if independent is None:
        independent = structure == "independent"
    factors = _pencil._pencil_jit(coupling) if independent else None
    if factors is None:
        noise_diagonal = False
    elif noise_diagonal is None:
        noise_diagonal = _pencil._gram_is_diagonal(factors)
    if independent:
        deterministic = False
    elif deterministic is None:
        deterministic = structure == "map"
    if deterministic:
        factors = _pencil._map_jit(coupling)
    return PreparedCoupling(coupling, factors, independent, noise_diagonal, bool(deterministic))


def _structure(c: JointGaussianMixture) -> str:
    """The declared structure; a "general" concrete coupling is read off its numbers (``prepare``
    is the one place that looks; a traced one stays "general")."""
    if c.structure != "general" or not _checks.is_concrete(c.covs):
        return c.structure
    return structure_of(np.asarray(c.covs), c.dim)


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


def _unwrap(fn: str, c, sched: Schedule | None = None):
    """The coupling and its time-free factors (``None``: the per-time path, also for a schedule
    with noise when V^T V is not diagonal)."""
    _checks.check_instance(
        f"exact.{fn}", "coupling", c, (JointGaussianMixture, PreparedCoupling),
        "a JointGaussianMixture (fmjax.independent_coupling(p0, p1) joins two GaussianMixtures)"
        " or an exact.prepare(...) of one",
    )  # fmt: skip
    if isinstance(c, PreparedCoupling):
        if sched is not None and sched.has_noise and not c.noise_diagonal:
            return c.coupling, None
        return c.coupling, c.factors
    return c, None


def _run(fn, want: frozenset, c, sched, t, x, precision):
    """Validate, flatten the batch, and evaluate ``want`` on the points x (N, d).

    Paths: with one t and d <= 8 the low-dimension kernel; time-free factors (a
    ``PreparedCoupling``, or a coupling whose static ``structure`` is "independent" or "map"
    with one t per point, factored here; with a noisy schedule only where V^T V is diagonal);
    else with one t the per-time Cholesky factors once for all points; else per point
    (vectorised small-d factors, or vmapped). The structure is pytree metadata, never read off
    the numbers here: eager, closed over and jit-argument calls take the same kernel.
    """
    _checks.check_precision(f"exact.{fn}", "precision", precision)
    prepared = isinstance(c, PreparedCoupling)
    c, factors = _unwrap(fn, c, sched if isinstance(sched, Schedule) else None)
    # Complex or half-precision points and times are refused (a cast would lose information).
    x = _checks.check_real_array(f"exact.{fn}", "x", x, c.means.dtype)
    t = _checks.check_real_array(f"exact.{fn}", "t", t, x.dtype)
    _check_inputs(fn, c, sched, t, x)
    d = c.dim
    batch = jnp.broadcast_shapes(t.shape, x.shape[:-1])
    xf = jnp.broadcast_to(x, batch + (d,)).reshape(-1, d)
    # The structure is static metadata of the coupling (never read off the numbers here), so an
    # eager call, a closure under jit and a jit argument take the same kernel.
    if not prepared and t.size > 1 and c.structure == "independent":
        factors = _pencil._pencil_jit(c)
        if sched.has_noise and not _pencil._gram_is_diagonal(factors):
            factors = None  # noise not diagonal in the pencil basis: per-time path
    elif not prepared and t.size > 1 and not sched.has_noise and c.structure == "map":
        factors = _pencil._map_jit(c)
    resp = want == {"responsibilities"}
    if t.size == 1 and d <= _lowdim.MAX_D and want <= _lowdim.WANTS:
        # One time at low d: K factorisations of size d cost less than any kernel's short
        # reductions over the components, so this kernel serves prepared couplings too.
        out = _lowdim._accumulate_low_jit(c, sched, t.reshape(()), xf, want, precision)
    elif factors is not None:  # time-free: any pattern of times in the same two products
        tf = t.reshape(()) if t.size == 1 else jnp.broadcast_to(t, batch).reshape(-1)
        is_map = isinstance(factors, _pencil._Map)
        if resp:
            kernel = (
                _pencil._responsibilities_map_jit if is_map else _pencil._responsibilities_free_jit
            )
            out = kernel(factors, sched, tf, xf, precision=precision)
        elif not is_map and d <= _lowdim.MAX_D and want <= _lowdim.WANTS:
            out = _lowdim._accumulate_low_free_jit(factors, sched, tf, xf, want, precision)
        else:
            kernel = _pencil._accumulate_map_jit if is_map else _pencil._accumulate_free_jit
            out = kernel(factors, sched, tf, xf, want=want, precision=precision)
    else:
        if resp:
            kernel = functools.partial(_kernels._responsibilities_jit, precision=precision)
        else:
            kernel = functools.partial(_kernels._accumulate_jit, want=want, precision=precision)
        if t.size == 1:  # one time for all points: factor once
            out = kernel(c, sched, t.reshape(()), xf)
        elif not resp and d <= _kernels._SMALL_D:  # per point, vectorised small-d factors
            tf = jnp.broadcast_to(t, batch).reshape(-1)
            out = _kernels._accumulate_points_jit(c, sched, tf, xf, want=want, precision=precision)
        else:  # one time per point: factor per point, vmapped
            tf = jnp.broadcast_to(t, batch).reshape(-1)

            def one(ti, xi):
                return jax.tree.map(lambda a: a[0], kernel(c, sched, ti, xi[None]))

            out = jax.vmap(one)(tf, xf)
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
            "divergence" (...). Static.
        precision: matmul precision (static); "highest" keeps float32 exact on GPUs (no TF32).

    Returns:
        ``Evaluation(velocity, log_prob, score, divergence)`` with ``None`` for the quantities
        not requested.

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
    """Marginal velocity u_t(x) = E[dX_t/dt | X_t = x]: x (..., d) -> (..., d). See ``evaluate``."""
    return _one("velocity", coupling, schedule, t, x, precision)


def log_prob(
    coupling: JointGaussianMixture,
    schedule: Schedule,
    t: Float[ArrayLike, "..."],
    x: Float[ArrayLike, "... d"],
    *,
    precision: Precision = "highest",
) -> Float[Array, "..."]:
    """Log-density log p_t(x): x (..., d) -> (...). See ``evaluate``."""
    return _one("log_prob", coupling, schedule, t, x, precision)


def score(
    coupling: JointGaussianMixture,
    schedule: Schedule,
    t: Float[ArrayLike, "..."],
    x: Float[ArrayLike, "... d"],
    *,
    precision: Precision = "highest",
) -> Float[Array, "... d"]:
    """Score grad_x log p_t(x): x (..., d) -> (..., d). See ``evaluate``."""
    return _one("score", coupling, schedule, t, x, precision)


def divergence(
    coupling: JointGaussianMixture,
    schedule: Schedule,
    t: Float[ArrayLike, "..."],
    x: Float[ArrayLike, "... d"],
    *,
    precision: Precision = "highest",
) -> Float[Array, "..."]:
    """Divergence of the marginal velocity, div u_t(x): x (..., d) -> (...). See ``evaluate``."""
    return _one("divergence", coupling, schedule, t, x, precision)


def responsibilities(
    coupling: JointGaussianMixture,
    schedule: Schedule,
    t: Float[ArrayLike, "..."],
    x: Float[ArrayLike, "... d"],
    *,
    precision: Precision = "highest",
) -> Float[Array, "... K"]:
    """Posterior component probabilities P(K = k | X_t = x): x (..., d) -> (..., K)."""
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
    """The law p_t of X_t at one scalar time t, as a K-component GaussianMixture on R^d."""
    coupling, _ = _unwrap("marginal", coupling)
    t = _checks.check_real_array("exact.marginal", "t", t, coupling.means.dtype)
    if t.ndim != 0:
        _checks.fail("exact.marginal", "t", "a scalar", f"shape {t.shape}")
    _check_inputs("marginal", coupling, schedule, t, coupling.means[:1, : coupling.dim])
    mu, _, cov, _ = _kernels._path_blocks(coupling, schedule, t.astype(coupling.means.dtype))
    return GaussianMixture._from_leaves(coupling.weights, mu, cov)
