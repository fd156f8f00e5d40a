"""Class-conditional exact quantities of a labelled Gaussian-mixture coupling.

A coupling whose components carry class labels (``JointGaussianMixture(..., labels=...)``, or
``independent_coupling(p0, p1)`` with a labelled target ``p1``) defines, for each class y, the
sub-mixture of the components labelled y with weights renormalised, w_k 1[l_k = y] / pi_y where
pi_y = sum_{k: l_k = y} w_k. Its path p_t(x | y), velocity u_t(x | y) and score are those of the
exact engine run on that sub-mixture (``given``). The class posterior P(Y = y | X_t = x) is the
sum over the components labelled y of the responsibilities P(K = k | X_t = x): the Bayes
classifier at every t.

The label y = C (``n_classes``) is the null class of classifier-free guidance: the unconditional
quantities (all components, weights as they are), as the UNet's ``y = num_classes``.

Labels are static pytree metadata, so the class masks are constants; the label ``y`` itself may
be traced (one per point, under ``jit`` and ``vmap``). With one label per point the engine runs
once per point under ``vmap`` (whatever depends only on the coupling and a shared t, e.g. the
factorisations, is computed once for all points).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

from fmjax import _checks, exact
from fmjax._typing import Precision
from fmjax.mixtures import JointGaussianMixture
from fmjax.schedules import Schedule

__all__ = [
    "ConditionalField",
    "class_posterior",
    "class_weights",
    "evaluate",
    "given",
    "log_prob",
    "sample",
    "labelled_pairs",
    "score",
    "velocity",
    "velocity_field",
]

_QUANTITIES = ("velocity", "log_prob", "score", "divergence")


def _coupling(fn: str, c) -> JointGaussianMixture:
    """The joint mixture inside ``c`` (a coupling or a prepared one), which must be labelled."""
    _checks.check_instance(
        f"conditional.{fn}",
        "coupling",
        c,
        (JointGaussianMixture, exact.PreparedCoupling),
        "a JointGaussianMixture or an exact.prepare(...) of one",
    )
    inner = c.coupling if isinstance(c, exact.PreparedCoupling) else c
    if inner.labels is None:
        _checks.fail(
            f"conditional.{fn}",
            "coupling",
            "labelled (built with `labels=` or from a labelled target by independent_coupling)",
            "labels=None",
        )
    return inner


def _masks(labels: tuple[int, ...], dtype) -> np.ndarray:
    """(K, C) one-hot of the component labels (a constant: labels are static)."""
    lab = np.asarray(labels)
    return (lab[:, None] == np.arange(lab.max() + 1)[None]).astype(dtype)


def class_weights(coupling: JointGaussianMixture | exact.PreparedCoupling) -> Float[Array, " C"]:
    """The class prior pi_y = P(Y = y) = sum of the weights of the components labelled y.

    Args:
        coupling: a labelled coupling or its ``exact.prepare``.

    Returns:
        (C,): the class weights (summing to 1).
    """
    c = _coupling("class_weights", coupling)
    return jnp.matmul(c.weights, _masks(c.labels, c.weights.dtype), precision="highest")


def _check_y(fn: str, y, n_classes: int) -> Array:
    """Integer labels in 0..C (C: the null class); values checked when concrete."""
    y = jnp.asarray(y)
    if not jnp.issubdtype(y.dtype, jnp.integer):
        _checks.fail(f"conditional.{fn}", "y", "an integer array", f"dtype {y.dtype}", TypeError)
    if _checks.is_concrete(y) and y.size and (int(y.min()) < 0 or int(y.max()) > n_classes):
        _checks.fail(
            f"conditional.{fn}",
            "y",
            f"in 0..{n_classes} ({n_classes}: the null class)",
            f"values in {int(y.min())}..{int(y.max())}",
        )
    return y


def _reweight(c, log_scale: Array):
    """``c`` with weights w_k exp(log_scale_k): same type, prepared factors kept (their log
    weights shifted by the same amounts, so nothing is refactored)."""
    if isinstance(c, exact.PreparedCoupling):
        return c.reweighted(log_scale)
    w = jnp.where(jnp.isfinite(log_scale), c.weights * jnp.exp(log_scale), 0.0)
    return JointGaussianMixture._from_leaves(
        w, c.means, c.covs, structure=c.structure, labels=c.labels
    )


def given(
    coupling: JointGaussianMixture | exact.PreparedCoupling, y: Int[ArrayLike, ""]
) -> JointGaussianMixture | exact.PreparedCoupling:
    """The sub-coupling of class ``y`` (weights w_k 1[l_k = y] / pi_y), of the same type.

    Args:
        coupling: a labelled coupling or its ``exact.prepare``.
        y: one label, scalar int in 0..C; y = C (the null class) returns the coupling as is
            (numerically: weights multiplied by 1). May be traced.

    Returns:
        A coupling accepted by every ``fmjax.exact`` function (a prepared one stays prepared).
    """
    c = _coupling("given", coupling)
    c_n = max(c.labels) + 1
    y = _check_y("given", y, c_n)
    if y.ndim != 0:
        _checks.fail("conditional.given", "y", "a scalar label", f"shape {y.shape}")
    masks = _masks(c.labels, c.weights.dtype)  # (K, C)
    pi = jnp.matmul(c.weights, masks, precision="highest")  # (C,)
    yc = jnp.minimum(y, c_n - 1)
    member = jnp.asarray(np.asarray(c.labels))[:, None] == yc  # (K, 1)
    log_scale = jnp.where(member[:, 0], -jnp.log(pi[yc]), -jnp.inf)
    log_scale = jnp.where(y == c_n, jnp.zeros_like(log_scale), log_scale)
    return _reweight(coupling, log_scale.astype(c.weights.dtype))


def _run(fn: str, want: frozenset, coupling, schedule, t, x, y, precision) -> dict:
    c = _coupling(fn, coupling)
    y = _check_y(fn, y, max(c.labels) + 1)
    x = _checks.check_real_array(f"conditional.{fn}", "x", x, c.means.dtype)
    t = _checks.check_real_array(f"conditional.{fn}", "t", t, x.dtype)
    if x.ndim < 1 or x.shape[-1] != c.dim:
        _checks.fail(f"conditional.{fn}", "x", f"of shape (..., d={c.dim})", f"shape {x.shape}")
    try:
        batch = jnp.broadcast_shapes(t.shape, x.shape[:-1], y.shape)
    except ValueError:
        _checks.fail(
            f"conditional.{fn}",
            "y",
            f"broadcastable against x.shape[:-1] = {x.shape[:-1]} and t.shape = {t.shape}",
            f"shape {y.shape}",
        )
    _checks.check_instance(f"conditional.{fn}", "schedule", schedule, Schedule, "an fmjax Schedule")
    schedule.check_times(f"conditional.{fn}", "t", t)
    quantities = tuple(sorted(want))
    if y.size == 1:  # one class: the engine on its sub-mixture, all points at once
        sub = given(coupling, y.reshape(()))
        out = exact.evaluate(sub, schedule, t, x, quantities, precision=precision)
        return {q: getattr(out, q) for q in want}
    d = c.dim
    xf = jnp.broadcast_to(x, batch + (d,)).reshape(-1, d)
    yf = jnp.broadcast_to(y, batch).reshape(-1)
    tf = t.reshape(()) if t.size == 1 else jnp.broadcast_to(t, batch).reshape(-1)
    out = _per_point(coupling, schedule, tf, xf, yf, quantities, precision)
    return {k: v.reshape(batch + v.shape[1:]) for k, v in out.items()}


@functools.partial(jax.jit, static_argnames=("schedule", "quantities", "precision"))
def _per_point(coupling, schedule, t, x, y, quantities, precision) -> dict:
    """The engine on class y_i's sub-mixture at each point x_i (N, d), vmapped over points;
    a shared t (scalar) stays outside the vmap, so its factors are computed once."""

    def one(ti, xi, yi):
        out = exact.evaluate(given(coupling, yi), schedule, ti, xi, quantities, precision=precision)
        return {q: getattr(out, q) for q in quantities}

    if t.ndim == 0:
        return jax.vmap(functools.partial(one, t))(x, y)
    return jax.vmap(one)(t, x, y)


def evaluate(
    coupling: JointGaussianMixture | exact.PreparedCoupling,
    schedule: Schedule,
    t: Float[ArrayLike, "..."],
    x: Float[ArrayLike, "... d"],
    y: Int[ArrayLike, "..."],
    quantities: tuple[str, ...] = ("velocity", "log_prob"),
    *,
    precision: Precision = "highest",
) -> exact.Evaluation:
    """Exact quantities of class ``y``'s sub-mixture: u_t(x | y), log p_t(x | y), score, div.

    Args:
        coupling: a labelled coupling (K components) or its ``exact.prepare``.
        schedule: the affine schedule.
        t: time(s), scalar or broadcastable against ``x.shape[:-1]``.
        x: points, (..., d).
        y: labels in 0..C (C = the null class: unconditional), scalar or broadcastable
            against ``x.shape[:-1]`` (one label per point).
        quantities: as ``exact.evaluate``.
        precision: matmul precision (static).

    Returns:
        ``exact.Evaluation`` with the requested fields of shape (...,) or (..., d).
    """
    if isinstance(quantities, str) or not set(quantities) <= set(_QUANTITIES) or not quantities:
        _checks.fail(
            "conditional.evaluate",
            "quantities",
            f"a non-empty tuple of names from {_QUANTITIES}",
            quantities,
            TypeError if isinstance(quantities, str) else ValueError,
        )
    want = frozenset(quantities)
    return exact.Evaluation(**_run("evaluate", want, coupling, schedule, t, x, y, precision))


def velocity(
    coupling: JointGaussianMixture | exact.PreparedCoupling,
    schedule: Schedule,
    t: Float[ArrayLike, "..."],
    x: Float[ArrayLike, "... d"],
    y: Int[ArrayLike, "..."],
    *,
    precision: Precision = "highest",
) -> Float[Array, "... d"]:
    """u_t(x | y) = E[dX_t | X_t = x, Y = y], the velocity of class ``y``'s sub-mixture.

    Args:
        coupling: a labelled coupling (K components, C classes) or its ``exact.prepare``.
        schedule: the affine schedule.
        t: time(s), scalar or broadcastable against ``x.shape[:-1]``.
        x: points, (..., d).
        y: labels in 0..C (C: the null class, unconditional), scalar or (...).
        precision: matmul precision (static).

    Returns:
        (..., d): the class-conditional velocity.
    """
    return _run("velocity", frozenset({"velocity"}), coupling, schedule, t, x, y, precision)[
        "velocity"
    ]


def log_prob(
    coupling: JointGaussianMixture | exact.PreparedCoupling,
    schedule: Schedule,
    t: Float[ArrayLike, "..."],
    x: Float[ArrayLike, "... d"],
    y: Int[ArrayLike, "..."],
    *,
    precision: Precision = "highest",
) -> Float[Array, "..."]:
    """log p_t(x | y), the log-density of class ``y``'s sub-mixture at time t.

    Args:
        coupling: a labelled coupling (K components, C classes) or its ``exact.prepare``.
        schedule: the affine schedule.
        t: time(s), scalar or broadcastable against ``x.shape[:-1]``.
        x: points, (..., d).
        y: labels in 0..C (C: the null class, unconditional), scalar or (...).
        precision: matmul precision (static).

    Returns:
        (...): the class-conditional log-density.
    """
    return _run("log_prob", frozenset({"log_prob"}), coupling, schedule, t, x, y, precision)[
        "log_prob"
    ]


def score(
    coupling: JointGaussianMixture | exact.PreparedCoupling,
    schedule: Schedule,
    t: Float[ArrayLike, "..."],
    x: Float[ArrayLike, "... d"],
    y: Int[ArrayLike, "..."],
    *,
    precision: Precision = "highest",
) -> Float[Array, "... d"]:
    """grad_x log p_t(x | y), the score of class ``y``'s sub-mixture at time t.

    Args:
        coupling: a labelled coupling (K components, C classes) or its ``exact.prepare``.
        schedule: the affine schedule.
        t: time(s), scalar or broadcastable against ``x.shape[:-1]``.
        x: points, (..., d).
        y: labels in 0..C (C: the null class, unconditional), scalar or (...).
        precision: matmul precision (static).

    Returns:
        (..., d): the class-conditional score.
    """
    return _run("score", frozenset({"score"}), coupling, schedule, t, x, y, precision)["score"]


def class_posterior(
    coupling: JointGaussianMixture | exact.PreparedCoupling,
    schedule: Schedule,
    t: Float[ArrayLike, "..."],
    x: Float[ArrayLike, "... d"],
    *,
    precision: Precision = "highest",
) -> Float[Array, "... C"]:
    """P(Y = y | X_t = x), the responsibilities summed by label.

    Its argmax is the Bayes classifier of X_t (at t = 1: of the target's samples).
    Args:
        coupling: a labelled coupling (K components, C classes) or its ``exact.prepare``.
        schedule: the affine schedule.
        t: time(s), scalar or broadcastable against ``x.shape[:-1]``.
        x: points, (..., d).
        precision: matmul precision (static).

    Returns:
        (..., C): the class posterior (rows sum to 1).
    """
    c = _coupling("class_posterior", coupling)
    r = exact.responsibilities(coupling, schedule, t, x, precision=precision)
    return jnp.matmul(r, _masks(c.labels, r.dtype), precision="highest")


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["coupling"],
    meta_fields=["schedule", "precision"],
)
@dataclasses.dataclass(frozen=True)
class ConditionalField:
    """The exact class-conditional velocity as a field ``(t, x, y) -> (..., d)``.

    ``y`` in 0..C, C (``null``) the null class; ``y=None`` is the null class too, as for the
    UNet. A pytree (the coupling's arrays are leaves), usable by ``sample.guided``.

    Args:
        coupling: a labelled coupling or its ``exact.prepare``.
        schedule: the affine schedule (static).
        precision: matmul precision (static).
    """

    coupling: JointGaussianMixture | exact.PreparedCoupling
    schedule: Schedule
    precision: Precision = "highest"

    @property
    def null(self) -> int:
        """The null label C."""
        return _coupling("ConditionalField", self.coupling).n_classes

    def __call__(
        self,
        t: Float[ArrayLike, "..."],
        x: Float[ArrayLike, "... d"],
        y: Int[ArrayLike, "..."] | None = None,
    ) -> Float[Array, "... d"]:
        """u_t(x | y), as ``velocity(coupling, schedule, t, x, y)``."""
        y = self.null if y is None else y
        return velocity(self.coupling, self.schedule, t, x, y, precision=self.precision)


def velocity_field(
    coupling: JointGaussianMixture | exact.PreparedCoupling,
    schedule: Schedule,
    *,
    precision: Precision = "highest",
) -> ConditionalField:
    """The exact u_t(x | y) as a field ``(t, x, y)``; ``coupling`` may be prepared.

    Args:
        coupling: a labelled coupling or its ``exact.prepare``.
        schedule: the affine schedule.
        precision: matmul precision (static).

    Returns:
        a ``ConditionalField`` (a pytree), callable as ``field(t, x, y)``.
    """
    _coupling("velocity_field", coupling)
    _checks.check_instance(
        "conditional.velocity_field", "schedule", schedule, Schedule, "an fmjax Schedule"
    )
    return ConditionalField(coupling, schedule, precision)


def sample(
    key: PRNGKeyArray,
    coupling: JointGaussianMixture | exact.PreparedCoupling,
    n: int,
    y: Int[ArrayLike, " n"] | None = None,
) -> tuple[Float[Array, "n d"], Float[Array, "n d"], Int[Array, " n"]]:
    """Draw ``n`` labelled pairs ``(x0, x1, y)`` (n static).

    Args:
        key: PRNG key.
        coupling: a labelled coupling (or its ``exact.prepare``).
        n: number of pairs.
        y: optional (n,) classes to draw from (pair i from class y_i's sub-mixture); default:
            classes drawn with their prior pi (each pair's class is its component's label).

    Returns:
        x0 (n, d), x1 (n, d) and the labels y (n,) int32.
    """
    c = _coupling("sample", coupling)
    n = _checks.check_int("conditional.sample", "n", n)
    _checks.check_key("conditional.sample", "key", key)
    labels = jnp.asarray(np.asarray(c.labels), jnp.int32)
    if y is not None:
        y = _check_y("sample", y, c.n_classes - 1)
        if y.shape != (n,):
            _checks.fail("conditional.sample", "y", f"of shape (n={n},)", f"shape {y.shape}")
    factor = c._sampling_factor(True)  # (K, 2d, 2d), F F^T = covs (cached when concrete)
    z, comp = _sample_jit(c.weights, c.means, factor, labels, key, n, y)
    return z[:, : c.dim], z[:, c.dim :], labels[comp]


@functools.partial(jax.jit, static_argnums=5)
def _sample_jit(weights, means, factor, labels, key, n: int, y):
    """(n, 2d) draws and their components; with labels ``y`` each from its class's components."""
    k_comp, k_noise = jax.random.split(key)
    logits = jnp.log(weights)
    if y is None:
        comp = jax.random.categorical(k_comp, logits, shape=(n,))
    else:
        member = labels[None, :] == y[:, None]  # (n, K)
        comp = jax.random.categorical(k_comp, jnp.where(member, logits[None], -jnp.inf), axis=-1)
    eps = jax.random.normal(k_noise, (n, means.shape[-1]), means.dtype)
    z = means[comp] + jnp.einsum("nij,nj->ni", factor[comp], eps, precision="highest")
    return z, comp


def labelled_pairs(coupling: JointGaussianMixture | exact.PreparedCoupling):
    """The pair sampler ``(key, n) -> (x0, x1, y)`` of a labelled coupling, for the
    conditional losses (``losses.cfm(..., num_classes=C)``).

    Args:
        coupling: a labelled coupling or its ``exact.prepare``.

    Returns:
        a function ``(key, n) -> (x0 (n, d), x1 (n, d), y (n,))``.
    """
    _coupling("labelled_pairs", coupling)
    return functools.partial(_labelled_draw, coupling)


def _labelled_draw(coupling, key, n):
    return sample(key, coupling, n)
