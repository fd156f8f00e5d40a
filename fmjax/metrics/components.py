"""Per-component moments and the cross-entropy of samples against an exact Gaussian mixture
(two-sided checks: a collapsed sampler and a spread-out one both show)."""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from fmjax import _checks
from fmjax.mixtures import GaussianMixture

__all__ = ["ComponentStats", "component_stats", "SampleChecks", "sample_checks"]

_HIGHEST = "highest"


class ComponentStats(NamedTuple):
    """Responsibility-weighted moments of samples, one row per component of a mixture.

    For exact samples X ~ p = sum_k w_k N(m_k, S_k) and alpha_k(x) = P(k | X = x),
    E[alpha_k(X)] = w_k, E[alpha_k(X) X] = w_k m_k and E[alpha_k(X) X X^T] = w_k (S_k + m_k m_k^T),
    so the estimates below are consistent for the mixture's own (w_k, m_k, S_k): a sampler that
    collapses a mode shrinks its ``spread`` below the truth, one that spreads it out inflates it.

    Attributes:
        weights: (K,) mean responsibility of each component (estimates w_k).
        means: (K, d) responsibility-weighted means (estimate m_k).
        covs: (K, d, d) responsibility-weighted covariances (estimate S_k).
        spread: (K,) trace of ``covs``.
        spread_ratio: (K,) ``spread`` / tr S_k (1 for exact samples, up to noise).
        mean_error: (K,) |means - m_k| / sqrt(tr S_k).
        weight_error: (K,) weights - w_k.
    """

    weights: Float[Array, " K"]
    means: Float[Array, "K d"]
    covs: Float[Array, "K d d"]
    spread: Float[Array, " K"]
    spread_ratio: Float[Array, " K"]
    mean_error: Float[Array, " K"]
    weight_error: Float[Array, " K"]


def component_stats(samples: Float[ArrayLike, "n d"], mixture: GaussianMixture) -> ComponentStats:
    """Weights, means and covariances of ``samples`` per exact-responsibility component.

    Each sample is shared among the components of ``mixture`` by its exact responsibilities
    alpha_k(x) (soft assignment, no clustering), so for exact samples every estimate is
    consistent for the mixture's own parameters (see ``ComponentStats``). Jit-compatible.

    Args:
        samples: (n, d) points, e.g. ODE or SDE samples of a learned model.
        mixture: the exact target ``GaussianMixture`` with K components on R^d.

    Returns:
        ``ComponentStats`` with (K,), (K, d) and (K, d, d) fields.
    """
    fn = "metrics.component_stats"
    _checks.check_instance(fn, "mixture", mixture, GaussianMixture, "a GaussianMixture")
    x = _checks.check_real_array(fn, "samples", samples, mixture.means.dtype)
    if x.ndim != 2 or x.shape[1] != mixture.dim:
        _checks.fail(fn, "samples", f"of shape (n, d={mixture.dim})", f"shape {x.shape}")
    alpha = mixture.responsibilities(x)  # (n, K)
    mass = jnp.sum(alpha, axis=0)  # (K,)
    safe = jnp.maximum(mass, jnp.finfo(x.dtype).tiny)
    means = jnp.einsum("nk,nd->kd", alpha, x, precision=_HIGHEST) / safe[:, None]
    dx = x[:, None, :] - means[None]  # (n, K, d): centred per component, no cancellation
    covs = jnp.einsum("nk,nki,nkj->kij", alpha, dx, dx, precision=_HIGHEST) / safe[:, None, None]
    spread = jnp.trace(covs, axis1=-2, axis2=-1)
    true_spread = jnp.trace(mixture.covs, axis1=-2, axis2=-1)
    mean_error = jnp.linalg.norm(means - mixture.means, axis=-1) / jnp.sqrt(true_spread)
    weights = mass / x.shape[0]
    return ComponentStats(
        weights=weights,
        means=means,
        covs=covs,
        spread=spread,
        spread_ratio=spread / true_spread,
        mean_error=mean_error,
        weight_error=weights - mixture.weights,
    )


class SampleChecks(NamedTuple):
    """Two-sided checks of samples X ~ q against an exact mixture p (``sample_checks``).

    The cross-entropy E_q[-log p(X)] equals the entropy H(p) for q = p; a sampler that collapses
    the modes of p puts its mass where p is high and drives it below H(p), one that spreads them
    out drives it above. Comparing with the same statistic on exact samples of p (its noise
    level is ``cross_entropy_stderr`` there) makes the check two-sided, unlike a distance that
    stays near its noise level under collapse. The component fields are ``component_stats``'.

    Attributes:
        cross_entropy: E_q[-log p(X)] over the samples, nats (for exact samples: H(p)).
        cross_entropy_stderr: its Monte Carlo standard error, std(-log p(X)) / sqrt(n).
        weight_error: (K,) responsibility-weighted weight minus w_k.
        mean_error: (K,) |mean - m_k| / sqrt(tr S_k).
        spread_ratio: (K,) tr(covariance) / tr S_k (< 1: collapsed, > 1: spread out).
        worst_spread_ratio: the spread ratio farthest from 1 (in |log ratio|).
        max_weight_error: max over k of |weight_error|.
        max_mean_error: max over k of ``mean_error``.
    """

    cross_entropy: Float[Array, ""]
    cross_entropy_stderr: Float[Array, ""]
    weight_error: Float[Array, " K"]
    mean_error: Float[Array, " K"]
    spread_ratio: Float[Array, " K"]
    worst_spread_ratio: Float[Array, ""]
    max_weight_error: Float[Array, ""]
    max_mean_error: Float[Array, ""]

    def cross_entropy_z(self, reference: SampleChecks) -> Float[Array, ""]:
        """(cross_entropy - reference.cross_entropy) in standard errors of the difference.

        With ``reference`` the checks of exact samples of p drawn independently of these, this
        is ~N(0, 1) for an exact sampler, far below 0 for a collapsed one, far above for a
        spread-out one.
        """
        diff = self.cross_entropy - reference.cross_entropy
        return diff / jnp.hypot(self.cross_entropy_stderr, reference.cross_entropy_stderr)


def sample_checks(samples: Float[ArrayLike, "n d"], mixture: GaussianMixture) -> SampleChecks:
    """The cross-entropy and per-component moments of ``samples`` under an exact mixture.

    Run it on generated samples and on exact samples of ``mixture`` (their noise level at the
    same n): see ``SampleChecks``. Jit-compatible.

    Args:
        samples: (n, d) points, e.g. ODE or SDE samples of a learned model (n >= 2).
        mixture: the exact target ``GaussianMixture`` with K components on R^d.

    Returns:
        ``SampleChecks`` with scalar and (K,) fields.
    """
    if jnp.shape(samples)[:1] in ((0,), (1,)):
        _checks.fail("metrics.sample_checks", "samples", "at least 2 points", jnp.shape(samples))
    stats = component_stats(samples, mixture)  # checks the arguments
    x = jnp.asarray(samples, mixture.means.dtype)
    nlp = -mixture.log_prob(x)
    ratio = stats.spread_ratio
    return SampleChecks(
        cross_entropy=jnp.mean(nlp),
        cross_entropy_stderr=jnp.std(nlp, ddof=1) / jnp.sqrt(x.shape[0]),
        weight_error=stats.weight_error,
        mean_error=stats.mean_error,
        spread_ratio=ratio,
        worst_spread_ratio=ratio[jnp.argmax(jnp.abs(jnp.log(ratio)))],
        max_weight_error=jnp.max(jnp.abs(stats.weight_error)),
        max_mean_error=jnp.max(stats.mean_error),
    )
