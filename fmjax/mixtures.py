"""Gaussian mixtures and Gaussian-mixture couplings, as immutable pytrees.

``GaussianMixture`` is a mixture on R^d; ``JointGaussianMixture`` is a mixture on R^{2d} whose
blocks are ordered [x0; x1], i.e. a coupling of a source and a target with cross-covariances.
Both validate their arguments eagerly when built from concrete arrays (never under a trace) and
pass through ``jit``, ``vmap`` and ``grad``: their arrays are the pytree leaves, and rebuilding
from leaves (inside JAX transformations) skips validation.
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from fmjax import _checks

__all__ = [
    "GaussianMixture",
    "JointGaussianMixture",
    "independent_coupling",
    "standard_normal",
    "random_spd",
    "random_gaussian_mixture",
    "random_joint_mixture",
    "IllConditionedWarning",
    "cond_warn",
]

_HIGHEST = jax.lax.Precision.HIGHEST


def _is_concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def _as_float(owner: str, x, name: str) -> Array:
    """A real float32 / float64 array (integers cast to the default float), else TypeError."""
    return _checks.check_real_array(owner, name, x)


def _validate(owner: str, weights, means, covs, dim_name: str = "d", joint: bool = False) -> None:
    """Shape checks always; value checks (finite, weights, SPD) only on concrete arrays.

    ``joint=True`` (a coupling on R^{2d}): the diagonal blocks S00 and S11 must be SPD and
    factorisable in the dtype, the whole covariance symmetric and positive semi-definite (it may
    be singular, as for a deterministic optimal-transport coupling); see ``_validate_joint_covs``.
    """
    if weights.ndim != 1:
        raise _checks.named_error(
            owner, "weights", f"{owner}: `weights` must have shape (K,), got {weights.shape}"
        )
    k = weights.shape[0]
    if k < 1:
        raise _checks.named_error(
            owner, "weights", f"{owner}: need at least one component, got `weights` of shape (0,)"
        )
    if means.ndim != 2 or means.shape[0] != k:
        raise _checks.named_error(
            owner,
            "means",
            f"{owner}: `means` must have shape (K={k}, {dim_name}), got {means.shape}",
        )
    n = means.shape[1]
    if n < 1:
        raise _checks.named_error(
            owner,
            "means",
            f"{owner}: `means` must have shape (K={k}, {dim_name}) with {dim_name} >= 1, "
            f"got {means.shape}",
        )
    if covs.shape != (k, n, n):
        raise _checks.named_error(
            owner,
            "covs",
            f"{owner}: `covs` must have shape (K={k}, {n}, {n}) to match `means`, got {covs.shape}",
        )
    if not _is_concrete(weights, means, covs):
        return
    w, m = np.asarray(weights, np.float64), np.asarray(means, np.float64)
    for name, a in (("weights", w), ("means", m)):
        if not np.all(np.isfinite(a)):
            raise _checks.named_error(owner, name, f"{owner}: `{name}` contains NaN or inf")
    if np.any(w < 0):
        raise _checks.named_error(
            owner, "weights", f"{owner}: `weights` must be >= 0, got min {w.min():.3g}"
        )
    # float32 sums of K weights carry ~K * 6e-8 error; 1e-5 admits that and rejects real mistakes.
    if abs(w.sum() - 1.0) > 1e-5:
        raise _checks.named_error(
            owner, "weights", f"{owner}: `weights` must sum to 1 (within 1e-5), got {w.sum():.8g}"
        )
    dtype = np.dtype(jnp.result_type(weights, means, covs))
    tol_sym = 1e-5 if dtype == np.float32 else 1e-10
    # Covariances are checked in chunks of components so a large K x n x n array is never
    # copied whole to float64 (eager validation must not be what runs out of memory).
    step = max(1, (1 << 24) // (n * n))
    worst = (1.0, 0)
    check = _validate_joint_covs if joint and n % 2 == 0 else _validate_covs
    for lo in range(0, k, step):
        cond, j = check(owner, np.asarray(covs[lo : lo + step], np.float64), lo, tol_sym, dtype)
        worst = max(worst, (cond, j))
    cond, j = worst
    if cond > cond_warn(dtype):
        warnings.warn(
            f"{owner}: `covs[{j}]` has condition number {cond:.3g}, above {cond_warn(dtype):.3g} "
            f"(0.01 / eps of {dtype}): quantities where this component dominates may lose two or "
            "more significant digits in this dtype (use float64 or regularise the covariance)",
            IllConditionedWarning,
            stacklevel=3,
        )


def _check_labels(owner: str, labels, k: int) -> tuple[int, ...] | None:
    """Labels as a tuple of K ints >= 0 (static metadata), or ``None``; checked eagerly."""
    if labels is None:
        return None
    if isinstance(labels, jax.core.Tracer):
        _checks.fail(owner, "labels", "concrete (static metadata)", "a traced array", TypeError)
    lab = np.asarray(labels)
    if lab.dtype == bool or not np.issubdtype(lab.dtype, np.integer):
        _checks.fail(
            owner, "labels", "an integer array of shape (K,)", f"dtype {lab.dtype}", TypeError
        )
    if lab.shape != (k,):
        _checks.fail(owner, "labels", f"of shape (K={k},)", f"shape {lab.shape}")
    if np.any(lab < 0):
        _checks.fail(owner, "labels", ">= 0", f"min {lab.min()}")
    return tuple(int(v) for v in lab)


class IllConditionedWarning(UserWarning):
    """A covariance is valid but so ill-conditioned that results in its dtype lose accuracy."""


def cond_warn(dtype) -> float:
    """Condition number above which a covariance warns: 0.01 / eps (8.4e4 float32, 4.5e13 float64).

    Relative errors of the factorisation-based quantities grow like cond * eps, so beyond this
    they can exceed 1%. At 1 / eps (8.4e6 in float32) the covariance is numerically singular in
    that dtype and is refused.

    Args:
        dtype: a float dtype.

    Returns:
        the condition-number threshold, a float.
    """
    return 0.01 / float(np.finfo(dtype).eps)


def _check_finite_symmetric(owner: str, c: np.ndarray, offset: int, tol_sym: float) -> None:
    if not np.all(np.isfinite(c)):
        raise _checks.named_error(owner, "covs", f"{owner}: `covs` contains NaN or inf")
    scale = np.maximum(np.abs(c).max(axis=(1, 2)), np.finfo(np.float64).tiny)
    asym = np.abs(c - np.swapaxes(c, 1, 2)).max(axis=(1, 2)) / scale
    if np.any(asym > tol_sym):
        j = int(np.argmax(asym))
        raise _checks.named_error(
            owner,
            "covs",
            f"{owner}: `covs[{offset + j}]` is not symmetric "
            f"(relative asymmetry {asym[j]:.2g} > {tol_sym:g})",
        )


def _validate_joint_covs(
    owner: str, c: np.ndarray, offset: int, tol_sym: float, dtype
) -> tuple[float, int]:
    """Joint covariances [[S00, S01], [S10, S11]]: finite and symmetric; S00 and S11 checked as
    ``_validate_covs`` checks a covariance; the whole positive semi-definite, i.e. the Schur
    complement S11 - S10 S00^{-1} S01 has no eigenvalue below -tol * max|S11| with
    tol = 1e3 * eps(dtype) * cond(S00) (rounding of a rank-deficient joint stored in ``dtype``).

    The joint itself may be singular: a deterministic coupling x1 = T(x0) (optimal transport
    between Gaussians) has a zero Schur complement. Returns the largest condition number of the
    diagonal blocks and its component index.
    """
    _check_finite_symmetric(owner, c, offset, tol_sym)
    d = c.shape[-1] // 2
    s00, s01, s11 = c[:, :d, :d], c[:, :d, d:], c[:, d:, d:]
    cond0, j0 = _validate_covs(owner, s00, offset, tol_sym, dtype, where=" in its S00 block")
    cond1, j1 = _validate_covs(owner, s11, offset, tol_sym, dtype, where=" in its S11 block")
    chol = np.linalg.cholesky(s00)
    b = np.linalg.solve(chol, s01)  # L0^{-1} S01, so S10 S00^{-1} S01 = B^T B
    schur = s11 - np.swapaxes(b, 1, 2) @ b
    schur = 0.5 * (schur + np.swapaxes(schur, 1, 2))
    eig_min = np.linalg.eigvalsh(schur)[:, 0]
    e00 = np.linalg.eigvalsh(s00)
    cond00 = e00[:, -1] / e00[:, 0]
    tol = 1e3 * float(np.finfo(dtype).eps) * cond00 * np.abs(s11).max(axis=(1, 2))
    if np.any(eig_min < -tol):
        j = int(np.argmin(eig_min + tol))
        raise _checks.named_error(
            owner,
            "covs",
            f"{owner}: `covs[{offset + j}]` must be positive semi-definite (the Schur complement "
            f"S11 - S10 S00^-1 S01 has eigenvalue {eig_min[j]:.3g} < -{tol[j]:.3g}): no pair "
            "(X0, X1) has these covariances",
        )
    return max((cond0, j0), (cond1, j1))


def _validate_covs(
    owner: str, c: np.ndarray, offset: int, tol_sym: float, dtype, where: str = ""
) -> tuple[float, int]:
    """Finite, symmetric (relative tolerance), positive definite (Cholesky succeeds), and
    factorisable in ``dtype`` (condition number below 1 / eps, Cholesky succeeds in ``dtype``).

    Returns the largest condition number in the chunk and its component index.
    """
    _check_finite_symmetric(owner, c, offset, tol_sym)
    try:
        np.linalg.cholesky(c)
    except np.linalg.LinAlgError:
        eig_min = np.linalg.eigvalsh(c).min(axis=1)
        j = int(np.argmin(eig_min))
        raise _checks.named_error(
            owner,
            "covs",
            f"{owner}: `covs[{offset + j}]` is not positive definite{where} "
            f"(smallest eigenvalue {eig_min[j]:.3g})",
        ) from None
    eig = np.linalg.eigvalsh(c)  # ascending, all > 0 here up to rounding
    tiny = float(np.finfo(dtype).tiny)
    if np.any(eig[:, 0] < tiny):  # subnormal variances: their factors and solves under/overflow
        j = int(np.argmin(eig[:, 0]))
        raise _checks.named_error(
            owner,
            "covs",
            f"{owner}: `covs[{offset + j}]` must have its eigenvalues in {np.dtype(dtype)}'s "
            f"normal range (>= {tiny:.3g}){where}, got smallest eigenvalue {eig[j, 0]:.3g} (use "
            "float64 or rescale the data)",
        )
    cond = eig[:, -1] / np.maximum(eig[:, 0], np.finfo(np.float64).tiny)
    cond = np.where(eig[:, 0] > 0, cond, np.inf)
    j = int(np.argmax(cond))
    eps = float(np.finfo(dtype).eps)
    low = np.dtype(dtype) != np.float64
    chol_ok = True
    if low:
        cd = c.astype(dtype)
        try:
            chol = np.linalg.cholesky(cd)
            ok = np.all(np.isfinite(chol), axis=(1, 2)) & np.all(
                np.diagonal(chol, axis1=1, axis2=2) > 0, axis=1
            )
            if not np.all(ok):
                chol_ok, j = False, int(np.argmin(ok))
        except np.linalg.LinAlgError:
            chol_ok = False
    if not chol_ok or cond[j] * eps >= 1:
        raise _checks.named_error(
            owner,
            "covs",
            f"{owner}: `covs[{offset + j}]` must be positive definite in {np.dtype(dtype)}{where} "
            f"(condition number < 1 / eps = {1 / eps:.3g}, Cholesky factorisable in that "
            f"dtype), got condition number {cond[j]:.3g} (use float64 or regularise the "
            "covariance)",
        )
    return float(cond[j]), offset + j


class _MixtureBase:
    """Shared pytree plumbing: leaves are (weights, means, covs); unflattening skips __init__.

    ``_factor`` caches the sampling factor F (F F^T = covs) of a concrete mixture. It is not a
    leaf: it is a function of the leaves, so a mixture rebuilt from (traced) leaves has none and
    ``sample`` factors in-graph, which keeps gradients with respect to ``covs`` exact.
    """

    __slots__ = ("weights", "means", "covs", "_factor", "labels")
    weights: Float[Array, " K"]
    means: Float[Array, "K n"]
    covs: Float[Array, "K n n"]
    labels: tuple[int, ...] | None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        jax.tree_util.register_pytree_with_keys(
            cls,
            lambda m: (
                tuple(
                    (jax.tree_util.GetAttrKey(f), getattr(m, f))
                    for f in ("weights", "means", "covs")
                ),
                m._aux(),
            ),
            lambda aux, leaves: cls._from_leaves(*leaves, **dict(aux)),
            flatten_func=lambda m: ((m.weights, m.means, m.covs), m._aux()),
        )

    @classmethod
    def _from_leaves(cls, weights, means, covs, labels: tuple[int, ...] | None = None):
        obj = object.__new__(cls)
        object.__setattr__(obj, "weights", weights)
        object.__setattr__(obj, "means", means)
        object.__setattr__(obj, "covs", covs)
        object.__setattr__(obj, "_factor", None)
        object.__setattr__(obj, "labels", labels)
        return obj

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is immutable")

    def _aux(self) -> tuple:
        """Static pytree metadata, ``((name, value), ...)`` (hashable): what survives flatten /
        unflatten, jit and vmap."""
        return () if self.labels is None else (("labels", self.labels),)

    @property
    def n_classes(self) -> int | None:
        """Number of classes C = max(labels) + 1 of a labelled mixture, else ``None``."""
        return None if self.labels is None else max(self.labels) + 1

    @property
    def n_components(self) -> int:
        """Number of components K (the last axis of ``weights``)."""
        return self.weights.shape[-1]

    def __repr__(self) -> str:
        """Shapes as they are: a stacked batch (``jax.vmap`` of a constructor) shows its
        ``batch_shape``, and leaves that are not arrays (``jax.tree.map(jnp.shape, m)``) show
        as themselves."""
        name, leaves = type(self).__name__, (self.weights, self.means, self.covs)
        aux = "".join(f", {k}={v!r}" for k, v in self._aux())
        if not all(hasattr(v, "shape") and hasattr(v, "dtype") for v in leaves):
            w, m, c = leaves
            return f"{name}(weights={w!r}, means={m!r}, covs={c!r}{aux})"
        batch = tuple(self.weights.shape[:-1])
        head = f"batch_shape={batch}, " if batch else ""
        return (
            f"{name}({head}n_components={self.weights.shape[-1]}, "
            f"dim={self.means.shape[-1]}, dtype={self.means.dtype}{aux})"
        )

    def _sample_full(self, key: PRNGKeyArray, n: int, joint: bool = False) -> Float[Array, "n D"]:
        fn = f"mixtures.{type(self).__name__}.sample"
        _checks.check_key(fn, "key", key)  # shapes and dtypes only: fine on tracers
        n = _checks.check_int(fn, "n", n)
        return _sample_jit(self.weights, self.means, self._sampling_factor(joint), key, n)

    def _sampling_factor(self, joint: bool) -> Array:
        """F with F F^T = covs: computed once and cached when concrete, else factored in-graph.

        Why cache: a ``sample`` compiled into a training step would otherwise run batched LAPACK
        (Cholesky, eigh) at every step; besides the cost, two such calls running concurrently can
        occupy every worker of XLA's CPU thread pool while each waits for its own sub-tasks on
        that pool, a deadlock seen on 2-core machines. A concrete factor removes LAPACK from the
        compiled step (it becomes a gather and a matmul).
        """
        factor = _joint_factor if joint else jnp.linalg.cholesky
        if not _is_concrete(self.covs):
            return factor(self.covs)
        if self._factor is None:
            # Evaluated now even while an outer function is traced (``sample`` inside a jitted
            # step), so the factor is a constant of that program, not a part of it.
            with jax.ensure_compile_time_eval():
                object.__setattr__(self, "_factor", factor(self.covs))
        return self._factor

    def _points(self, method: str, name: str, x, dim: int) -> Array:
        """``x`` as a real array of shape (..., dim), named in the error otherwise."""
        fn = f"mixtures.{type(self).__name__}.{method}"
        x = _checks.check_real_array(fn, name, x, self.means.dtype)
        if x.ndim < 1 or x.shape[-1] != dim:
            _checks.fail(fn, name, f"of shape (..., d={dim})", f"shape {x.shape}")
        return x

    def _log_prob_full(self, x: Float[Array, "... D"]) -> Float[Array, "..."]:
        return _mixture_log_prob(self.weights, self.means, self.covs, x)


def _sample_impl(weights, means, chol, key, n: int):
    """``n`` draws of sum_k w_k N(m_k, F_k F_k^T) from the factors ``chol`` (K, D, D)."""
    k_comp, k_noise = jax.random.split(key)
    comp = jax.random.categorical(k_comp, jnp.log(weights), shape=(n,))
    dim = means.shape[-1]
    eps = jax.random.normal(k_noise, (n, dim), dtype=means.dtype)
    # Gather one factor per sample in chunks: memory O(chunk d^2), not O(n d^2).
    chunk = max(1, min(n, (1 << 22) // (dim * dim)))
    noise = jax.lax.map(
        lambda ce: jnp.matmul(chol[ce[0]], ce[1], precision=_HIGHEST),
        (comp, eps),
        batch_size=chunk,
    )
    return means[comp] + noise


# Compiled once per shapes and n: an eager lax.map would otherwise compile on every call.
_sample_jit = jax.jit(_sample_impl, static_argnums=(4,))


def _joint_factor(covs):
    """F with F F^T = covs for positive semi-definite joint covariances (K, 2d, 2d).

    The Cholesky factor where the joint is clearly non-singular (so full-rank joints sample as
    before); otherwise [[L0, 0], [S10 L0^{-T}, R]] with S00 = L0 L0^T and R R^T the Schur
    complement S11 - S10 S00^{-1} S01, its eigenvalues below 1e3 eps max|S| (rounding of an
    exactly singular joint) set to 0: a deterministic coupling x1 = T(x0) then samples exactly.
    """
    d = covs.shape[-1] // 2
    eps = jnp.finfo(covs.dtype).eps
    scale = jnp.max(jnp.abs(covs), axis=(1, 2))
    chol = jnp.linalg.cholesky(covs)
    diag = jnp.diagonal(chol, axis1=1, axis2=2)
    ok = jnp.all(jnp.isfinite(chol), axis=(1, 2)) & (jnp.min(diag, axis=1) ** 2 > 1e3 * eps * scale)
    # The block factor's LAPACK calls wait for the Cholesky above: two batched LAPACK calls
    # running at once can deadlock XLA's CPU thread pool (see ``_sampling_factor``).
    covs, chol = jax.lax.optimization_barrier((covs, chol))
    s00, s10, s11 = covs[:, :d, :d], covs[:, d:, :d], covs[:, d:, d:]
    l0 = jnp.linalg.cholesky(s00)
    b = jnp.swapaxes(
        jax.scipy.linalg.solve_triangular(l0, jnp.swapaxes(s10, 1, 2), lower=True), 1, 2
    )
    schur = s11 - jnp.matmul(b, jnp.swapaxes(b, 1, 2), precision=_HIGHEST)
    lam, u = jnp.linalg.eigh(0.5 * (schur + jnp.swapaxes(schur, 1, 2)))
    lam = jnp.where(lam > 1e3 * eps * scale[:, None], lam, 0.0)
    r = u * jnp.sqrt(lam)[:, None, :]
    zeros = jnp.zeros_like(l0)
    block = jnp.concatenate(
        [jnp.concatenate([l0, zeros], axis=2), jnp.concatenate([b, r], axis=2)], axis=1
    )
    return jnp.where(ok[:, None, None], jnp.nan_to_num(chol), block)


def _mixture_log_prob(weights, means, covs, x):
    """log sum_k w_k N(x; m_k, S_k) for x (..., D), by Cholesky solves and logsumexp."""
    return jax.nn.logsumexp(_component_log_probs(weights, means, covs, x), axis=-1)


def _component_log_probs(weights, means, covs, x):
    """log w_k + log N(x; m_k, S_k), shape (..., K), for x (..., D), by Cholesky solves."""
    k, dim = means.shape
    batch = x.shape[:-1]
    xf = x.reshape(-1, 1, dim)
    chol = jnp.linalg.cholesky(covs)  # (K, D, D)
    diff = xf - means[None]  # (N, K, D)
    z = jax.scipy.linalg.solve_triangular(
        jnp.broadcast_to(chol[None], (xf.shape[0], k, dim, dim)), diff[..., None], lower=True
    )[..., 0]
    half_logdet = jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)
    log_w = jnp.log(weights) - half_logdet - 0.5 * dim * math.log(2 * math.pi)
    logn = log_w[None] - 0.5 * jnp.sum(z**2, axis=-1)
    return logn.reshape(batch + (k,))


class GaussianMixture(_MixtureBase):
    """Mixture of K Gaussians on R^d.

    Args:
        weights: (K,) mixture weights, >= 0, summing to 1.
        means: (K, d) component means.
        covs: (K, d, d) symmetric positive-definite component covariances.
        labels: optional (K,) integer class of each component, >= 0 (keyword-only). Stored as
            static pytree metadata (a tuple of ints: it survives flatten / unflatten, ``jit``,
            ``vmap`` and stacking of equally labelled mixtures); the classes are 0..C-1 with
            C = ``n_classes`` = max + 1. Class-conditional quantities: ``fmjax.conditional``.

    Raises:
        TypeError: naming the argument, for complex arrays or a dtype other than float32 /
            float64 (integers are cast to the default float).
        ValueError: naming the argument, for bad shapes (d >= 1), NaN/inf, negative weights,
            weights not summing to 1 (within 1e-5), a non-symmetric or non-positive-definite
            covariance, or one that cannot be factorised in the mixture's dtype (condition number
            >= 1 / eps, 8.4e6 in float32).

    Warns:
        IllConditionedWarning: for a covariance with condition number above ``cond_warn(dtype)``
            = 0.01 / eps (8.4e4 in float32, 4.5e13 in float64).
    """

    def __init__(
        self, weights: ArrayLike, means: ArrayLike, covs: ArrayLike, *, labels: ArrayLike = None
    ):
        w = _as_float("mixtures.GaussianMixture", weights, "weights")
        m = _as_float("mixtures.GaussianMixture", means, "means")
        c = _as_float("mixtures.GaussianMixture", covs, "covs")
        _validate("mixtures.GaussianMixture", w, m, c)
        dtype = jnp.result_type(w, m, c)
        object.__setattr__(self, "weights", w.astype(dtype))
        object.__setattr__(self, "means", m.astype(dtype))
        object.__setattr__(self, "covs", c.astype(dtype))
        object.__setattr__(self, "_factor", None)
        lab = _check_labels("mixtures.GaussianMixture", labels, w.shape[0])
        object.__setattr__(self, "labels", lab)

    @property
    def dim(self) -> int:
        """Dimension d."""
        return self.means.shape[-1]

    def sample(self, key: PRNGKeyArray, n: int) -> Float[Array, "n d"]:
        """Draw ``n`` samples (n is static)."""
        return self._sample_full(key, n)

    def log_prob(self, x: Float[ArrayLike, "... d"]) -> Float[Array, "..."]:
        """Log-density at ``x`` of shape (..., d)."""
        return self._log_prob_full(self._points("log_prob", "x", x, self.dim))

    def responsibilities(self, x: Float[ArrayLike, "... d"]) -> Float[Array, "... K"]:
        """P(component k | X = x) at ``x`` of shape (..., d): the softmax over k of
        log w_k + log N(x; m_k, S_k)."""
        x = self._points("responsibilities", "x", x, self.dim)
        return jax.nn.softmax(_component_log_probs(self.weights, self.means, self.covs, x), -1)

    def mean(self) -> Float[Array, " d"]:
        """Mean of the mixture."""
        return self.weights @ self.means

    def covariance(self) -> Float[Array, "d d"]:
        """Covariance of the mixture (law of total covariance)."""
        mu = self.mean()
        dm = self.means - mu[None]
        return jnp.einsum("k,kij->ij", self.weights, self.covs) + jnp.einsum(
            "k,ki,kj->ij", self.weights, dm, dm, precision=_HIGHEST
        )


#: The structures a coupling may declare (``JointGaussianMixture(..., structure=...)``).
STRUCTURES = ("general", "independent", "map")


class JointGaussianMixture(_MixtureBase):
    """Mixture of K Gaussians on R^{2d} coupling X0 (first d coordinates) and X1 (last d).

    Its ``structure`` is static pytree metadata, set where it is known: ``"independent"``
    (S01 = S10 = 0 in every component; ``independent_coupling``), ``"map"`` (every component is
    x1 = m1 + A (x0 - m0) with A symmetric positive-definite; ``couplings.gaussian_ot`` and
    ``mixture_ot``) or ``"general"``. It survives flatten / unflatten, ``jit`` (closed over or as
    an argument), ``vmap`` and stacking, and selects the kernel of ``fmjax.exact`` (a time-free
    factorisation for the first two with one t per point): no structure is detected from the
    numbers at call time, so the same coupling takes the same kernel however it is passed.

    Args:
        weights: (K,) mixture weights, >= 0, summing to 1.
        means: (K, 2d) component means, blocks [m0; m1].
        covs: (K, 2d, 2d) covariances, blocks [[S00, S01], [S10, S11]] with
            S01 = Cov(X0, X1) = S10^T: symmetric positive semi-definite, with S00 and S11
            positive definite. The joint may be singular (rank d for a deterministic coupling
            x1 = m1 + A (x0 - m0), e.g. ``couplings.gaussian_ot``); its density ``log_prob``
            then does not exist (NaN), but sampling and every quantity of ``fmjax.exact`` do,
            wherever the path covariance S_t = b^2 S00 + a b (S01 + S10) + a^2 S11 (+ gamma^2 I)
            is positive definite; ``couplings.check_path`` checks that on a schedule's interval.
        structure: ``"general"`` (default), ``"independent"`` or ``"map"`` (see above); a
            declared structure is verified on the covariances here, once.
        labels: optional (K,) integer class of each component (pair), >= 0, as for
            ``GaussianMixture``; ``source()`` and ``target()`` keep them.

    Raises:
        TypeError, ValueError: as for ``GaussianMixture``, where the SPD and dtype checks apply
            to the blocks S00 and S11; ``ValueError`` if the joint dimension is odd, or a joint
            covariance is not symmetric or not positive semi-definite (Schur complement
            S11 - S10 S00^{-1} S01 with an eigenvalue below -1e3 eps cond(S00) max|S11|), or
            the covariances do not have the declared ``structure``.

    Warns:
        IllConditionedWarning: for a block S00 or S11 with condition number above
            ``cond_warn(dtype)``.
    """

    __slots__ = ("structure",)

    def __init__(
        self,
        weights: ArrayLike,
        means: ArrayLike,
        covs: ArrayLike,
        *,
        structure: str = "general",
        labels: ArrayLike = None,
    ):
        fn = "mixtures.JointGaussianMixture"
        _checks.check_choice(fn, "structure", structure, STRUCTURES)
        w = _as_float(fn, weights, "weights")
        m = _as_float(fn, means, "means")
        c = _as_float(fn, covs, "covs")
        _validate(fn, w, m, c, dim_name="2d", joint=True)
        if m.shape[1] % 2:
            raise _checks.named_error(
                fn,
                "means",
                f"JointGaussianMixture: `means` must have an even last dimension 2d, got {m.shape}",
            )
        if structure != "general" and _is_concrete(c):
            found = structure_of(np.asarray(c), m.shape[1] // 2)
            if found != structure:
                _checks.fail(fn, "structure", f"the covariances' own ({found!r})", structure)
        dtype = jnp.result_type(w, m, c)
        object.__setattr__(self, "weights", w.astype(dtype))
        object.__setattr__(self, "means", m.astype(dtype))
        object.__setattr__(self, "covs", c.astype(dtype))
        object.__setattr__(self, "_factor", None)
        object.__setattr__(self, "structure", structure)
        object.__setattr__(self, "labels", _check_labels(fn, labels, w.shape[0]))

    @classmethod
    def _from_leaves(cls, weights, means, covs, structure: str = "general", labels=None):
        obj = super()._from_leaves(weights, means, covs, labels)
        object.__setattr__(obj, "structure", structure)
        return obj

    def _aux(self) -> tuple:
        return (("structure", self.structure),) + super()._aux()

    def is_standard_normal(self, end: int = 0) -> bool:
        """Whether X_end (``end`` 0: the source, 1: the target) is an N(0, I) independent of the
        other end, in every component: the case where a velocity determines the score
        (``sample.sde`` without ``score=``). Reads concrete arrays (not under a trace)."""
        fn = "mixtures.JointGaussianMixture.is_standard_normal"
        if end not in (0, 1):
            _checks.fail(fn, "end", "0 (the source) or 1 (the target)", end)
        d = self.dim
        side = slice(0, d) if end == 0 else slice(d, 2 * d)
        means, covs = np.asarray(self.means), np.asarray(self.covs)
        return bool(
            np.allclose(means[:, side], 0.0)
            and np.allclose(covs[:, side, side], np.eye(d))
            and not np.any(covs[:, :d, d:])
        )

    @property
    def dim(self) -> int:
        """Dimension d of each of X0 and X1."""
        return self.means.shape[-1] // 2

    def blocks(self):
        """Split into ``(m0, m1, S00, S01, S10, S11)``: (K, d) means and (K, d, d) blocks."""
        d = self.dim
        m, c = self.means, self.covs
        return m[:, :d], m[:, d:], c[:, :d, :d], c[:, :d, d:], c[:, d:, :d], c[:, d:, d:]

    def sample(self, key: PRNGKeyArray, n: int) -> tuple[Float[Array, "n d"], Float[Array, "n d"]]:
        """Draw ``n`` coupled pairs ``(x0, x1)`` (n is static); singular joints included."""
        z = self._sample_full(key, n, joint=True)
        return z[:, : self.dim], z[:, self.dim :]

    def log_prob(self, x0: Float[ArrayLike, "... d"], x1: Float[ArrayLike, "... d"]):
        """Joint log-density of pairs, shape (...); NaN for a singular joint (no density)."""
        x0 = self._points("log_prob", "x0", x0, self.dim)
        x1 = self._points("log_prob", "x1", x1, self.dim)
        x0, x1 = jnp.broadcast_arrays(x0, x1)
        return self._log_prob_full(jnp.concatenate([x0, x1], axis=-1))

    def source(self) -> GaussianMixture:
        """Marginal law of X0 (K components, some possibly equal)."""
        m0, _, s00, _, _, _ = self.blocks()
        return GaussianMixture._from_leaves(self.weights, m0, s00, self.labels)

    def target(self) -> GaussianMixture:
        """Marginal law of X1 (K components, some possibly equal)."""
        _, m1, _, _, _, s11 = self.blocks()
        return GaussianMixture._from_leaves(self.weights, m1, s11, self.labels)


def structure_of(covs: np.ndarray, dim: int) -> str:
    """The structure of concrete joint covariances (K, 2d, 2d), read off the numbers.

    "independent": S01 = S10 = 0 exactly. "map": A = S10 S00^{-1} symmetric positive-definite
    and S11 = A S00 A^T, to max(1e-10, 1e3 eps) relative (a float64 check). Else "general".
    Used once, where a structure is declared or ``exact.prepare`` is asked to look; never to
    choose a kernel at call time.
    """
    tol = max(1e-10, 1e3 * float(np.finfo(covs.dtype).eps))
    covs = np.asarray(covs, np.float64)
    d = dim
    s00, s10, s11 = covs[:, :d, :d], covs[:, d:, :d], covs[:, d:, d:]
    if not np.any(covs[:, :d, d:]) and not np.any(s10):
        return "independent"
    a = np.swapaxes(np.linalg.solve(s00, np.swapaxes(s10, -1, -2)), -1, -2)
    scale = np.max(np.abs(a), axis=(-2, -1))
    if np.any(np.max(np.abs(a - np.swapaxes(a, -1, -2)), axis=(-2, -1)) > tol * scale):
        return "general"
    resid = s11 - a @ s00 @ np.swapaxes(a, -1, -2)
    if np.any(np.max(np.abs(resid), axis=(-2, -1)) > tol * np.max(np.abs(s11), axis=(-2, -1))):
        return "general"
    spd = np.min(np.linalg.eigvalsh(0.5 * (a + np.swapaxes(a, -1, -2)))) > 0
    return "map" if spd else "general"


def independent_coupling(p0: GaussianMixture, p1: GaussianMixture) -> JointGaussianMixture:
    """Product coupling p0 x p1 as a joint mixture with K0 * K1 components.

    Component k = i * K1 + j pairs source component i with target component j; its covariance is
    block-diagonal (no cross-covariance).
    A labelled target (``p1.labels``) labels component k with the class of target component j.

    Args:
        p0: the source mixture, dimension d.
        p1: the target mixture, dimension d.

    Returns:
        the ``JointGaussianMixture`` on R^{2d}, structure "independent".

    Raises:
        ValueError: if ``p0`` and ``p1`` are not GaussianMixtures of the same dimension.

    Example:
        >>> p1 = GaussianMixture([0.5, 0.5], [[-2.0], [2.0]], [[[0.25]], [[0.25]]])
        >>> independent_coupling(standard_normal(1), p1)
        JointGaussianMixture(n_components=2, dim=2, dtype=float32, structure='independent')
    """
    fn = "mixtures.independent_coupling"
    for name, p in (("p0", p0), ("p1", p1)):
        _checks.check_instance(fn, name, p, GaussianMixture, "a GaussianMixture")
    if p0.dim != p1.dim:
        _checks.fail(fn, "p1", f"of the dimension of `p0` ({p0.dim})", f"dim {p1.dim}")
    k0, k1, d = p0.n_components, p1.n_components, p0.dim
    dtype = jnp.result_type(p0.means, p1.means)
    w = (p0.weights[:, None] * p1.weights[None, :]).reshape(k0 * k1).astype(dtype)
    m = jnp.concatenate(
        [jnp.repeat(p0.means, k1, axis=0), jnp.tile(p1.means, (k0, 1))], axis=1
    ).astype(dtype)
    zeros = jnp.zeros((k0 * k1, d, d), dtype)
    c00 = jnp.repeat(p0.covs, k1, axis=0).astype(dtype)
    c11 = jnp.tile(p1.covs, (k0, 1, 1)).astype(dtype)
    c = jnp.concatenate(
        [jnp.concatenate([c00, zeros], axis=2), jnp.concatenate([zeros, c11], axis=2)], axis=1
    )
    # Products of valid weights and block-diagonal SPD matrices are valid: skip re-validation
    # (it would also fail under a trace-free but expensive eigen-decomposition for large K).
    labels = None if p1.labels is None else p1.labels * k0  # component i * K1 + j: class of j
    out = JointGaussianMixture._from_leaves(w, m, c, structure="independent", labels=labels)
    if _is_concrete(p0.covs, p1.covs):
        # The sampling factor is block-diagonal in the two marginal factors: K0 + K1 Cholesky
        # factorisations of d x d instead of K0 K1 of 2d x 2d.
        with jax.ensure_compile_time_eval():  # constants even under an outer trace
            f0 = jnp.repeat(p0._sampling_factor(False), k1, axis=0).astype(dtype)
            f1 = jnp.tile(p1._sampling_factor(False), (k0, 1, 1)).astype(dtype)
            f = jnp.concatenate(
                [jnp.concatenate([f0, zeros], axis=2), jnp.concatenate([zeros, f1], axis=2)],
                axis=1,
            )
        object.__setattr__(out, "_factor", f)
    return out


def standard_normal(dim: int, dtype=None) -> GaussianMixture:
    """N(0, I) on R^dim as a one-component ``GaussianMixture``, the usual source p0.

    Args:
        dim: dimension d >= 1.
        dtype: float dtype (default: JAX's default float, float64 under ``jax_enable_x64``).

    Returns:
        a one-component ``GaussianMixture``.
    """
    dim = _checks.check_int("mixtures.standard_normal", "dim", dim, 1)
    dtype = _checks.check_float_dtype(
        "mixtures.standard_normal", "dtype", dtype or jnp.result_type(float)
    )
    return GaussianMixture._from_leaves(
        jnp.ones((1,), dtype), jnp.zeros((1, dim), dtype), jnp.eye(dim, dtype=dtype)[None]
    )


def random_spd(
    key: PRNGKeyArray, n: int, dim: int, eps: float = 0.1, dtype=None
) -> Float[Array, "n dim dim"]:
    """``n`` random SPD matrices C C^T / dim + eps I, with C standard normal (dim, dim).

    Args:
        key: PRNG key.
        n: number of matrices.
        dim: their size.
        eps: added to the diagonal, > 0.
        dtype: float dtype (default: JAX's default float).

    Returns:
        ``(n, dim, dim)`` symmetric positive-definite matrices.
    """
    dtype = _checks.check_float_dtype(
        "mixtures.random_spd", "dtype", dtype or jnp.result_type(float)
    )
    c = jax.random.normal(key, (n, dim, dim), dtype=dtype)
    eye = jnp.eye(dim, dtype=c.dtype)[None]
    return jnp.einsum("nij,nkj->nik", c, c, precision=_HIGHEST) / dim + eps * eye


def _check_random(name: str, key, n_components, dim) -> None:
    fn = f"mixtures.{name}"
    _checks.check_key(fn, "key", key)
    _checks.check_int(fn, "n_components", n_components)
    _checks.check_int(fn, "dim", dim)


def _random_parts(key, n_components, dim, mean_scale, eps, dtype):
    kw, km, kc = jax.random.split(key, 3)
    dtype = _checks.check_float_dtype(
        "mixtures.random_gaussian_mixture", "dtype", dtype or jnp.result_type(float)
    )
    w = jax.nn.softmax(jax.random.normal(kw, (n_components,), dtype))
    m = mean_scale * jax.random.normal(km, (n_components, dim), dtype)
    c = random_spd(kc, n_components, dim, eps, dtype)
    return w, m, c


def random_gaussian_mixture(
    key: PRNGKeyArray,
    n_components: int,
    dim: int,
    mean_scale: float = 3.0,
    eps: float = 0.1,
    dtype=None,
) -> GaussianMixture:
    """A random GMM: softmax-normal weights, N(0, mean_scale^2) means, C C^T / d + eps I covs.

    Args:
        key: PRNG key.
        n_components: K.
        dim: dimension d.
        mean_scale: standard deviation of the means.
        eps: added to every covariance's diagonal, > 0.
        dtype: float dtype (default: JAX's default float).

    Returns:
        a ``GaussianMixture`` of K components in R^dim.
    """
    _check_random("random_gaussian_mixture", key, n_components, dim)
    return GaussianMixture(*_random_parts(key, n_components, dim, mean_scale, eps, dtype))


def random_joint_mixture(
    key: PRNGKeyArray,
    n_components: int,
    dim: int,
    mean_scale: float = 3.0,
    eps: float = 0.1,
    dtype=None,
) -> JointGaussianMixture:
    """A random joint GMM on R^{2 dim} with full (cross-correlated) 2d x 2d covariances.

    Args:
        key: PRNG key.
        n_components: K.
        dim: dimension d.
        mean_scale: standard deviation of the means.
        eps: added to every covariance's diagonal, > 0.
        dtype: float dtype (default: JAX's default float).

    Returns:
        a ``JointGaussianMixture`` of K components on R^{2 dim} (structure "general").
    """
    _check_random("random_joint_mixture", key, n_components, dim)
    return JointGaussianMixture(*_random_parts(key, n_components, 2 * dim, mean_scale, eps, dtype))
