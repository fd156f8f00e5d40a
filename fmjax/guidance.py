"""The conditional report: how right a class-conditional (guided) field is, against exact answers.

For a labelled coupling every class-conditional quantity is closed form (``fmjax.conditional``),
so a guided field ṽ = v(·, ∅) + w (v(·, y) - v(·, ∅)) can be scored per class:

* the velocity error E|ṽ_t(X_t) - u_t(X_t | y)|^2 with X_t ~ p_t(· | y), t uniform on the
  schedule's interval, against E|u_t(X_t | y)|^2 for scale (0 for the exact field at w = 1);
* the class accuracy of ODE samples generated for class y under the exact Bayes classifier
  argmax_c P(c | X = x) at the end time, against the same accuracy of exact samples of class y
  (the Bayes accuracy of that class, with its standard error);
* the cross-entropy -E log p(X | y) of the samples under the exact class-conditional law at the
  end time, against the entropy H(p(· | y)) estimated on exact samples (with its standard error):
  guidance with w > 1 sharpens the classes (accuracy up, cross-entropy below the entropy).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from fmjax import _checks, conditional, data, sample
from fmjax.mixtures import JointGaussianMixture
from fmjax.schedules import Schedule

__all__ = ["ConditionalReport", "evaluate_conditional"]

_FN = "evaluate_conditional"


class ConditionalReport(NamedTuple):
    """What ``evaluate_conditional`` measures, per class (arrays (C,)) and averaged over classes.

    Attributes:
        weight: the guidance weight w.
        n: samples per class and estimate.
        class_prior: (C,) pi_y.
        velocity_error: (C,) E|ṽ_t(X_t) - u_t(X_t | y)|^2, X_t ~ p_t(· | y), t uniform.
        velocity_scale: (C,) E|u_t(X_t | y)|^2 on the same points.
        accuracy: (C,) fraction of the samples generated for class y that the exact Bayes
            classifier assigns to y.
        accuracy_stderr: (C,) its standard error.
        bayes_accuracy: (C,) the same on n_reference exact samples of class y (its exact value,
            up to its standard error).
        bayes_accuracy_stderr: (C,) its standard error.
        cross_entropy: (C,) -E log p(X | y) of the generated samples, nats.
        cross_entropy_stderr: (C,) its standard error.
        entropy: (C,) H(p(· | y)) estimated on the exact samples, nats.
        entropy_stderr: (C,) its standard error.
        mean_velocity_error: class mean of ``velocity_error``.
        relative_velocity_error: sum of velocity_error / sum of velocity_scale.
        mean_accuracy: class mean of ``accuracy``.
        mean_bayes_accuracy: class mean of ``bayes_accuracy``.
        mean_cross_entropy_gap: class mean of cross_entropy - entropy (nats; < 0: sharper than
            the class, > 0: more spread).
        nfe: velocity evaluations of the ODE solve.
    """

    weight: float
    n: int
    class_prior: Float[np.ndarray, " C"]
    velocity_error: Float[np.ndarray, " C"]
    velocity_scale: Float[np.ndarray, " C"]
    accuracy: Float[np.ndarray, " C"]
    accuracy_stderr: Float[np.ndarray, " C"]
    bayes_accuracy: Float[np.ndarray, " C"]
    bayes_accuracy_stderr: Float[np.ndarray, " C"]
    cross_entropy: Float[np.ndarray, " C"]
    cross_entropy_stderr: Float[np.ndarray, " C"]
    entropy: Float[np.ndarray, " C"]
    entropy_stderr: Float[np.ndarray, " C"]
    mean_velocity_error: float
    relative_velocity_error: float
    mean_accuracy: float
    mean_bayes_accuracy: float
    mean_cross_entropy_gap: float
    nfe: int


def _class_means(values: Array, labels: Array, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class mean and standard error of ``values`` (N,) grouped by ``labels`` (N,)."""
    count = jax.ops.segment_sum(jnp.ones_like(values), labels, n_classes)
    mean = jax.ops.segment_sum(values, labels, n_classes) / count
    sq = jax.ops.segment_sum((values - mean[labels]) ** 2, labels, n_classes) / count
    return np.asarray(mean, np.float64), np.asarray(jnp.sqrt(sq / count), np.float64)


def evaluate_conditional(
    field,
    coupling: JointGaussianMixture,
    schedule: Schedule,
    *,
    key: PRNGKeyArray,
    weight: float = 1.0,
    n: int = 500,
    n_reference: int | None = None,
    null: int | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    steps: int | None = None,
    solver: str = "tsit5",
) -> ConditionalReport:
    """Score a conditional field with guidance weight ``weight`` against the exact answers.

    Args:
        field: ``(t, x, y) -> (..., d)`` with a null label (e.g.
            ``conditional.velocity_field(coupling, schedule)``, or ``partial(model.apply, p)``
            of a model with ``num_classes``; then pass ``null``).
        coupling: the labelled coupling (or its ``exact.prepare``).
        schedule: its schedule (no latent noise needed; the end time is ``schedule.t_max``).
        key: PRNG key (keyword-only).
        weight: guidance weight w.
        n: points per class for the velocity error and samples per class.
        n_reference: exact samples per class for the Bayes accuracy and the entropy
            (default 4 n).
        null: the null label (default ``field.null``, else C).
        rtol, atol, steps, solver: of the ODE solve (``sample.ode``).

    Returns:
        A ``ConditionalReport``.
    """
    c = conditional._coupling(_FN, coupling)
    _checks.check_instance(_FN, "schedule", schedule, Schedule, "an fmjax Schedule")
    _checks.check_key(_FN, "key", key)
    n = _checks.check_int(_FN, "n", n, 2)
    n_ref = 4 * n if n_reference is None else _checks.check_int(_FN, "n_reference", n_reference, 2)
    n_classes = c.n_classes
    if null is None:  # an explicit null wins over the field's own
        null = getattr(field, "null", n_classes)
    null = _checks.check_int(_FN, "null", null, 0)
    k_vel, k_gen, k_ref = jax.random.split(key, 3)
    prior = np.asarray(conditional.class_weights(c), np.float64)

    # Velocity error of the guided field on X_t ~ p_t(. | y), n points per class.
    y = jnp.repeat(jnp.arange(n_classes, dtype=jnp.int32), n)
    guided = sample.guided(field, y, weight, null=null, schedule=schedule)
    x0, x1, _ = conditional.sample(jax.random.fold_in(k_vel, 1), coupling, y.shape[0], y)
    path = data.sample_path(k_vel, lambda k, m: (x0, x1), schedule, y.shape[0])
    v = guided(path.t, path.xt)
    u = conditional.velocity(coupling, schedule, path.t, path.xt, y)
    err, _ = _class_means(jnp.sum((v - u) ** 2, -1), y, n_classes)
    scale, _ = _class_means(jnp.sum(u**2, -1), y, n_classes)

    # Samples generated for each class, scored at the end time by the exact class laws.
    t_end = schedule.t_max
    g0, _, _ = conditional.sample(k_gen, coupling, y.shape[0], y)
    sol = sample.ode(
        guided, g0, schedule=schedule, rtol=rtol, atol=atol, steps=steps, solver=solver
    )
    acc, acc_se = _class_means(_correct(coupling, schedule, t_end, sol.x, y), y, n_classes)
    ce, ce_se = _class_means(
        -conditional.log_prob(coupling, schedule, t_end, sol.x, y), y, n_classes
    )

    # Exact samples of each class at the end time: the Bayes accuracy and the entropy.
    y_ref = jnp.repeat(jnp.arange(n_classes, dtype=jnp.int32), n_ref)
    r0, r1, _ = conditional.sample(jax.random.fold_in(k_ref, 1), coupling, y_ref.shape[0], y_ref)
    ref = data.sample_path(k_ref, lambda k, m: (r0, r1), schedule, y_ref.shape[0], t=t_end)
    bacc, bacc_se = _class_means(
        _correct(coupling, schedule, t_end, ref.xt, y_ref), y_ref, n_classes
    )
    ent, ent_se = _class_means(
        -conditional.log_prob(coupling, schedule, t_end, ref.xt, y_ref), y_ref, n_classes
    )
    return ConditionalReport(
        weight=float(weight),
        n=n,
        class_prior=prior,
        velocity_error=err,
        velocity_scale=scale,
        accuracy=acc,
        accuracy_stderr=acc_se,
        bayes_accuracy=bacc,
        bayes_accuracy_stderr=bacc_se,
        cross_entropy=ce,
        cross_entropy_stderr=ce_se,
        entropy=ent,
        entropy_stderr=ent_se,
        mean_velocity_error=float(err.mean()),
        relative_velocity_error=float(err.sum() / scale.sum()),
        mean_accuracy=float(acc.mean()),
        mean_bayes_accuracy=float(bacc.mean()),
        mean_cross_entropy_gap=float((ce - ent).mean()),
        nfe=int(sol.nfe),
    )


def _correct(coupling, schedule, t, x, y) -> Array:
    """1.0 where the exact Bayes classifier of X_t assigns x to its intended class y."""
    post = conditional.class_posterior(coupling, schedule, t, x)
    return (jnp.argmax(post, -1) == y).astype(x.dtype)
