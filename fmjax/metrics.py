"""Sample-based distances and errors against exact answers.

Two-sample distances between point clouds ``x`` (n, d) and ``y`` (m, d):

* ``energy_distance``: 2 E|X - Y| - E|X - X'| - E|Y - Y'| (U- or V-statistic),
* ``mmd``: squared maximum mean discrepancy with a sum of RBF kernels (unbiased),
* ``sliced_wasserstein``: mean over random directions of the 1-D W_p^p (ott-jax),
* ``w2``: squared 2-Wasserstein distance, exact (Hungarian, via ott-jax / optax) or entropic
  (debiased Sinkhorn divergence, ott-jax),
* ``gaussian_w2``: closed-form W2^2 between two Gaussians (the reference for the above).

Errors of a learned model against the exact GMM answers:

* ``velocity_error``: E|v(t, X_t) - u_t(X_t)|^2 over X_t ~ p_t, as a curve over times,
* ``nll``: mean negative log-likelihood of samples under an exact density,
* ``nfe_to_accuracy``: fewest solver steps whose samples are within a tolerance.

Pairwise sums are computed in row blocks (``lax.map``) with one matrix product per block at
``precision="highest"`` (no TF32 on GPUs), so memory stays O(block * m) and no (n, m, d) array is
formed. Everything except ``nfe_to_accuracy`` (a Python loop over a few step counts, each one a
separate solve) is jit-compatible, with sizes and options static.

The two-sample distances live in ``fmjax._kernel_distances`` (energy distance, MMD) and
``fmjax._wasserstein`` (sliced W, W2, Gaussian W2) and are re-exported here; the model errors are
defined here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from fmjax import exact
from fmjax._kernel_distances import energy_distance as energy_distance
from fmjax._kernel_distances import mmd as mmd
from fmjax._wasserstein import gaussian_w2 as gaussian_w2
from fmjax._wasserstein import sliced_wasserstein as sliced_wasserstein
from fmjax._wasserstein import w2 as w2
from fmjax.mixtures import JointGaussianMixture
from fmjax.schedules import Schedule

__all__ = [
    "energy_distance",
    "mmd",
    "sliced_wasserstein",
    "w2",
    "gaussian_w2",
    "velocity_error",
    "nll",
    "nfe_to_accuracy",
    "NFEResult",
]


VelocityField = Callable[[Array, Array], Array]


def _is_concrete(*xs) -> bool:
    return not any(isinstance(a, jax.core.Tracer) for a in xs)


# ----------------------------------------------------------------------------- model errors


def velocity_error(
    velocity: VelocityField,
    reference_velocity: VelocityField | None,
    coupling: JointGaussianMixture,
    schedule: Schedule,
    key: PRNGKeyArray,
    ts: Float[ArrayLike, " T"],
    n: int,
) -> Float[Array, " T"]:
    """Mean squared velocity error E_{X_t ~ p_t} |v(t, X_t) - u(t, X_t)|^2 at each time.

    X_t = b_t X0 + a_t X1 is sampled exactly from coupled pairs (X0, X1) of ``coupling``
    (fresh pairs at each time); all times are evaluated at once by ``vmap`` over t, each with a
    scalar t and an (n, d) batch, so the exact field factors its covariances once per time.
    Jit at the call site for speed, e.g. ``jax.jit(velocity_error, static_argnums=(0, 1, 6))``
    for fixed fields, or inside a jitted function that takes the model parameters.

    Args:
        velocity: field ``(t, x) -> (..., d)`` to assess, e.g. ``partial(model.apply, params)``.
        reference_velocity: field to compare against; None for the exact marginal velocity
            ``partial(fmjax.exact.velocity, coupling, schedule)``.
        coupling: joint mixture of (X0, X1) defining p_t.
        schedule: affine schedule.
        key: PRNG key for the samples.
        ts: (T,) times in [0, 1].
        n: samples per time (static).

    Returns:
        (T,) mean over samples of the squared Euclidean norm of the difference.
    """
    if not isinstance(coupling, JointGaussianMixture):
        raise ValueError(
            f"velocity_error: `coupling` must be a JointGaussianMixture, got {type(coupling)}"
        )
    if not isinstance(schedule, Schedule):
        raise ValueError(
            f"velocity_error: `schedule` must be an fmjax Schedule, got {type(schedule)}"
        )
    ts = jnp.asarray(ts)
    if not jnp.issubdtype(ts.dtype, jnp.floating):
        ts = ts.astype(coupling.means.dtype)
    if ts.ndim != 1:
        raise ValueError(f"velocity_error: `ts` must have shape (T,), got {ts.shape}")
    if _is_concrete(ts) and not np.all((np.asarray(ts) >= 0) & (np.asarray(ts) <= 1)):
        raise ValueError("velocity_error: `ts` must lie in [0, 1]")
    if int(n) < 1:
        raise ValueError(f"velocity_error: `n` must be >= 1, got {n}")
    if reference_velocity is None:
        reference_velocity = functools.partial(exact.velocity, coupling, schedule)

    def at(k, t):
        x0, x1 = coupling.sample(k, int(n))
        a, b, _, _ = schedule(t)
        xt = b * x0 + a * x1
        diff = velocity(t, xt) - reference_velocity(t, xt)
        return jnp.mean(jnp.sum(jnp.square(diff), axis=-1))

    keys = jax.random.split(key, ts.shape[0])
    return jax.vmap(at)(keys, ts)


def nll(
    target_log_prob: Callable[[Array], Array], samples: Float[ArrayLike, "n d"]
) -> Float[Array, ""]:
    """Mean negative log-likelihood -(1/n) sum_i log p(x_i) of samples under a density.

    With ``samples`` from a model and ``target_log_prob`` the exact target (e.g.
    ``GaussianMixture.log_prob``) this is the cross-entropy H(q_model, p) >= H(q_model); compare
    with the target's own entropy, estimated by ``nll(p.log_prob, p.sample(key, n))``.

    Args:
        target_log_prob: ``x (n, d) -> (n,)`` log-density.
        samples: (n, d) points.

    Returns:
        scalar mean NLL (nats).
    """
    samples = jnp.asarray(samples)
    if samples.ndim != 2:
        raise ValueError(f"nll: `samples` must have shape (n, d), got {samples.shape}")
    lp = target_log_prob(samples)
    if lp.shape != samples.shape[:1]:
        raise ValueError(f"nll: `target_log_prob` must map (n, d) to (n,), got {lp.shape}")
    return -jnp.mean(lp)


class NFEResult(NamedTuple):
    """Outcome of ``nfe_to_accuracy``.

    Attributes:
        nfe: fewest function evaluations reaching the tolerance, or None if none did.
        n_steps: the step count achieving it, or None.
        step_counts: the step counts tried, ascending.
        errors: error of each tried step count (same order), as floats.
    """

    nfe: int | None
    n_steps: int | None
    step_counts: tuple[int, ...]
    errors: tuple[float, ...]


def _rmse(a, b):
    return jnp.sqrt(jnp.mean(jnp.sum(jnp.square(a - b), axis=-1)))


def nfe_to_accuracy(
    solve: Callable[[int], Array],
    reference: Float[ArrayLike, "n d"],
    step_counts: Sequence[int],
    tol: float,
    *,
    evals_per_step: int = 1,
    error: Callable[[Array, Array], Array] | None = None,
    stop_early: bool = True,
) -> NFEResult:
    """Fewest fixed-step function evaluations whose samples are within ``tol`` of a reference.

    ``solve(n_steps)`` runs a fixed-step solver (e.g. Euler, midpoint) with ``n_steps`` steps
    and returns samples (n, d); ``reference`` is an accurate solution (e.g. an adaptive solve at
    a tight tolerance, or the exact transport map). The default ``error`` is the root mean
    squared distance sqrt(mean_i |x_i - r_i|^2), meaningful when ``solve`` and the reference
    start from the same initial points; pass e.g. ``energy_distance`` to compare laws instead.
    Step counts are tried in ascending order (a Python loop over a few separate solves).

    Args:
        solve: ``n_steps -> (n, d)`` samples.
        reference: (n, d) reference samples.
        step_counts: candidate step counts (positive ints).
        tol: accuracy threshold on ``error``.
        evals_per_step: velocity evaluations per step (Euler 1, midpoint / Heun 2, RK4 4).
        error: ``(samples, reference) -> scalar``; default RMSE as above.
        stop_early: stop at the first count within ``tol`` (the rest are not run).

    Returns:
        NFEResult with nfe = n_steps * evals_per_step of the smallest count within ``tol``.
    """
    counts = sorted({int(c) for c in step_counts})
    if not counts or counts[0] < 1:
        raise ValueError(f"nfe_to_accuracy: `step_counts` must be positive ints, got {step_counts}")
    if not float(tol) > 0:
        raise ValueError(f"nfe_to_accuracy: `tol` must be > 0, got {tol}")
    if int(evals_per_step) < 1:
        raise ValueError(f"nfe_to_accuracy: `evals_per_step` must be >= 1, got {evals_per_step}")
    err_fn = _rmse if error is None else error
    reference = jnp.asarray(reference)
    tried, errs, best = [], [], None
    for c in counts:
        e = float(err_fn(jnp.asarray(solve(c)), reference))
        tried.append(c)
        errs.append(e)
        if best is None and e <= tol:
            best = c
            if stop_early:
                break
    nfe = None if best is None else best * int(evals_per_step)
    return NFEResult(nfe, best, tuple(tried), tuple(errs))
