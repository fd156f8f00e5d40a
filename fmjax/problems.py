"""Named problems with exact answers: a coupling, a schedule and a one-line description.

Every problem's law of (X0, X1) is a Gaussian mixture, so its velocity, score and densities are
known exactly (``fmjax.exact``) and a learned model can be scored against them
(``fmjax.evaluate``). All use the linear schedule x_t = (1 - t) x0 + t x1 and, unless stated,
the independent coupling of N(0, I) with the target:

========================  ===  ===============================================================
name                        d  what
========================  ===  ===============================================================
``demo_2d``                 2  N(0, I) -> 5 anisotropic Gaussians on a ring (``fmjax demo``)
``gmm_2d``                  2  N(0, I) -> the 3-component target of experiment ``gmm_to_gmm``
``gmm_2d_joint``            2  ``gmm_to_gmm``'s joint coupling: 3 -> 3 components, corr. 0.9
``gmm_1d``                  1  2 modes at +-3 -> 3 modes at -6, 0, 6 (std 0.5), independent
``two_modes_3d``            3  N(0, I) -> the 2-mode target of ``flows_and_scores``
``eight_gaussians``         2  N(0, I) -> FFJORD's 8 Gaussians (``data.eight_gaussians``)
``digits_gmm``             64  N(0, I) -> a 20-component full-covariance GMM fitted to the
                               8x8 digits in [-1, 1] (``digits_gmm()``; needs scikit-learn)
``gmm_256``               256  N(0, I) -> a random 64-component GMM (seed 0)
========================  ===  ===============================================================

``get(name)`` builds a problem once per process and dtype (the digits fit takes ~1 s);
``names()`` lists them. Models trained by ``fmjax train --data gmm`` solve ``demo_2d``; those
trained with ``--data eight_gaussians`` solve ``eight_gaussians``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fmjax import _checks, schedules
from fmjax.mixtures import (
    GaussianMixture,
    JointGaussianMixture,
    independent_coupling,
    random_gaussian_mixture,
    standard_normal,
)

__all__ = ["Problem", "get", "names", "digits_gmm", "digits_gmm_labelled", "DIGITS_SHAPE"]

#: Shape (H, W, C) of one digits image; ``digits_gmm`` points are these, flattened.
DIGITS_SHAPE = (8, 8, 1)


class Problem(NamedTuple):
    """A problem with exact answers.

    Attributes:
        name: its registry name.
        coupling: the joint law of (X0, X1), a JointGaussianMixture on R^{2d}.
        schedule: the interpolation schedule.
        description: one line.
        image_shape: (H, W, C) when points are flattened images (``digits_gmm``), else None.
    """

    name: str
    coupling: JointGaussianMixture
    schedule: schedules.Schedule
    description: str
    image_shape: tuple[int, int, int] | None = None

    @property
    def dim(self) -> int:
        """Dimension d of X0 and X1."""
        return self.coupling.dim

    def source(self) -> GaussianMixture:
        """The law p0 of X0."""
        return self.coupling.source()

    def target(self) -> GaussianMixture:
        """The law p1 of X1."""
        return self.coupling.target()


def _diag(weights, means, stds, dtype) -> GaussianMixture:
    means = np.asarray(means, float)
    stds = np.broadcast_to(np.asarray(stds, float), means.shape)
    covs = np.stack([np.diag(s**2) for s in stds])
    return GaussianMixture(*(jnp.asarray(a, dtype) for a in (weights, means, covs)))


def _from_normal(target: GaussianMixture) -> JointGaussianMixture:
    return independent_coupling(standard_normal(target.dim, target.means.dtype), target)


def _demo_2d_parts():
    """(weights, means, covs) of the demo's 2-D target; ``experiments.demo_problem`` uses it."""
    angles = 2 * np.pi * np.arange(5) / 5 + np.pi / 2
    means = 4.0 * np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    covs = []
    for a in angles:  # long axis tangent to the ring
        rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        covs.append(rot @ np.diag([0.15**2, 0.6**2]) @ rot.T)
    return np.array([0.3, 0.25, 0.2, 0.15, 0.1]), means, np.stack(covs)


def _demo_2d(dtype):
    return _from_normal(GaussianMixture(*(jnp.asarray(a, dtype) for a in _demo_2d_parts())))


def _gmm_2d_parts():
    """(weights, means, covs) of the 2-D joint coupling; ``experiments.gmm_problems`` uses it."""
    m0 = np.array([[-4.0, 3.0], [-4.0, 0.0], [-4.0, -3.0]])
    m1 = np.array([[4.0, -3.0], [4.0, 0.0], [4.0, 3.0]])
    s0 = np.full((3, 2), 0.4)
    s1 = np.array([[0.3, 0.8], [0.7, 0.3], [0.5, 0.5]])
    rho = 0.9
    covs = np.zeros((3, 4, 4))
    for k in range(3):
        covs[k, :2, :2] = np.diag(s0[k] ** 2)
        covs[k, 2:, 2:] = np.diag(s1[k] ** 2)
        covs[k, :2, 2:] = covs[k, 2:, :2] = np.diag(rho * s0[k] * s1[k])
    return np.array([0.4, 0.35, 0.25]), np.concatenate([m0, m1], axis=1), covs


def _gmm_2d_joint(dtype):
    return JointGaussianMixture(*(jnp.asarray(a, dtype) for a in _gmm_2d_parts()))


def _gmm_2d(dtype):
    return _from_normal(_gmm_2d_joint(dtype).target())


def _gmm_1d(dtype):
    p0 = _diag([0.5, 0.5], [[-3.0], [3.0]], 0.5, dtype)
    p1 = _diag([0.3, 0.4, 0.3], [[-6.0], [0.0], [6.0]], 0.5, dtype)
    return independent_coupling(p0, p1)


def _two_modes_3d(dtype):
    means = [[-1.0, -0.5, 1.5], [1.0, 1.5, 0.25]]
    return _from_normal(_diag([0.5, 0.5], means, [0.25, 0.25, 0.15], dtype))


def _eight_gaussians(dtype):
    from fmjax.data import eight_gaussians_mixture

    return _from_normal(eight_gaussians_mixture(dtype=dtype))


def _digits(dtype):
    return _from_normal(digits_gmm(dtype=dtype))


def _gmm_256(dtype):
    return _from_normal(random_gaussian_mixture(jax.random.key(0), 64, 256, dtype=dtype))


_REGISTRY: dict[str, tuple[Callable, str, tuple[int, int, int] | None]] = {
    "demo_2d": (_demo_2d, "N(0, I) -> 5 anisotropic Gaussians on a ring of radius 4 (2-D)", None),
    "gmm_2d": (_gmm_2d, "N(0, I) -> 3 Gaussians at x = 4 (gmm_to_gmm's target, 2-D)", None),
    "gmm_2d_joint": (
        _gmm_2d_joint,
        "3 -> 3 Gaussians, component k to k with correlation 0.9 (gmm_to_gmm's joint, 2-D)",
        None,
    ),
    "gmm_1d": (_gmm_1d, "2 modes at +-3 -> 3 modes at -6, 0, 6, std 0.5 (1-D)", None),
    "two_modes_3d": (_two_modes_3d, "N(0, I) -> 2 elongated modes (flows_and_scores, 3-D)", None),
    "eight_gaussians": (_eight_gaussians, "N(0, I) -> FFJORD's 8 Gaussians (2-D)", None),
    "digits_gmm": (
        _digits,
        "N(0, I) -> 20-component GMM fitted to the 8x8 digits in [-1, 1] (64-D)",
        DIGITS_SHAPE,
    ),
    "gmm_256": (_gmm_256, "N(0, I) -> random 64-component GMM, seed 0 (256-D)", None),
}


def names() -> tuple[str, ...]:
    """The registered problem names, in the order of the module's table.

    Returns:
        the names, a tuple of str.
    """
    return tuple(_REGISTRY)


def get(name: str, *, dtype=None) -> Problem:
    """The problem ``name`` (built once per process and dtype, then cached).

    Args:
        name: one of ``names()``.
        dtype: float32 or float64 (default: JAX's default float).

    Returns:
        the ``Problem(name, coupling, schedule, description, image_shape)``.

    Raises:
        ValueError: for an unknown name; ImportError (naming ``fmjax[images]``) for
            ``digits_gmm`` without scikit-learn.
    """
    _checks.check_choice("problems.get", "name", name, _REGISTRY)
    dtype = _checks.check_float_dtype("problems.get", "dtype", dtype or jnp.result_type(float))
    return _build(name, dtype.name)


@functools.cache
def _build(name: str, dtype: str) -> Problem:
    builder, description, image_shape = _REGISTRY[name]
    return Problem(name, builder(jnp.dtype(dtype)), schedules.linear(), description, image_shape)


@functools.lru_cache(maxsize=8)
def _fit_digits(n_components: int, reg_covar: float, seed: int):
    _checks.require("sklearn", "problems.digits_gmm")
    from sklearn.mixture import GaussianMixture as SkGMM
    from threadpoolctl import threadpool_limits

    from fmjax.data import digits

    x = np.asarray(digits(flat=True, dtype=jnp.float32), np.float64)
    # One BLAS thread: EM on 1797 x 64 points is ~0.7 s that way, 5-20 s with busy threads.
    with threadpool_limits(1):
        fit = SkGMM(
            n_components, covariance_type="full", reg_covar=reg_covar, random_state=seed
        ).fit(x)
    return fit.weights_, fit.means_, fit.covariances_


def digits_gmm(
    n_components: int = 20, *, reg_covar: float = 1e-2, seed: int = 0, dtype=None
) -> GaussianMixture:
    """A Gaussian mixture fitted by EM to the 8x8 digits scaled to [-1, 1] (64-D, flat).

    scikit-learn's ``GaussianMixture`` with full covariances, ``reg_covar`` added to each
    covariance's diagonal (the border pixels are constant in the data; the regularisation keeps
    the condition numbers near 350) and k-means initialisation with ``random_state=seed``; the
    fit is cached per process. Samples, reshaped to (8, 8), look like digits.

    Args:
        n_components: K (20 for the ``digits_gmm`` problem).
        reg_covar: diagonal regularisation (> 0), in squared pixel units of [-1, 1].
        seed: random state of the k-means initialisation.
        dtype: float dtype (default: JAX's default float).

    Returns:
        the 64-D ``GaussianMixture`` of ``n_components`` components.

    Raises:
        ImportError: naming ``fmjax[images]`` without scikit-learn.
    """
    fn = "problems.digits_gmm"
    n_components = _checks.check_int(fn, "n_components", n_components, 1)
    reg_covar = _checks.check_positive(fn, "reg_covar", reg_covar)
    seed = _checks.check_int(fn, "seed", seed, 0)
    dtype = _checks.check_float_dtype(fn, "dtype", dtype or jnp.result_type(float))
    w, m, c = _fit_digits(n_components, reg_covar, seed)
    w = w / w.sum()
    c = 0.5 * (c + np.swapaxes(c, -1, -2))
    return GaussianMixture(*(jnp.asarray(a, dtype) for a in (w, m, c)))


@functools.lru_cache(maxsize=4)
def _fit_digits_by_class(per_class: int, reg_covar: float, seed: int):
    _checks.require("sklearn", "problems.digits_gmm_labelled")
    from sklearn.mixture import GaussianMixture as SkGMM
    from threadpoolctl import threadpool_limits

    from fmjax.data import digits, digits_labels

    x = np.asarray(digits(flat=True, dtype=jnp.float32), np.float64)
    y = np.asarray(digits_labels())
    parts = []
    with threadpool_limits(1):
        for c in range(10):  # one small EM fit per class (10 classes, host-side, once)
            fit = SkGMM(per_class, covariance_type="full", reg_covar=reg_covar, random_state=seed)
            fit.fit(x[y == c])
            parts.append((np.mean(y == c) * fit.weights_, fit.means_, fit.covariances_))
    w, m, cov = (np.concatenate([p[i] for p in parts]) for i in range(3))
    return w, m, cov, np.repeat(np.arange(10), per_class)


def digits_gmm_labelled(
    components_per_class: int = 2, *, reg_covar: float = 1e-2, seed: int = 0, dtype=None
) -> GaussianMixture:
    """A labelled Gaussian mixture of the 8x8 digits: one GMM fitted by EM per digit class.

    Component weights are the class frequency times the class GMM's weights; each component is
    labelled with its digit, so ``fmjax.conditional`` gives the exact class-conditional field,
    density and Bayes classifier in 64-D. Fitted as ``digits_gmm`` (full covariances,
    ``reg_covar`` on the diagonal, k-means initialisation with ``random_state=seed``), cached.

    Args:
        components_per_class: components per digit (K = 10 x this).
        reg_covar: diagonal regularisation (> 0).
        seed: random state of the k-means initialisation.
        dtype: float dtype (default: JAX's default float).

    Returns:
        a labelled ``GaussianMixture`` on R^64 with 10 x ``components_per_class`` components.

    Raises:
        ImportError: naming ``fmjax[images]`` without scikit-learn.
    """
    fn = "problems.digits_gmm_labelled"
    per_class = _checks.check_int(fn, "components_per_class", components_per_class, 1)
    reg_covar = _checks.check_positive(fn, "reg_covar", reg_covar)
    seed = _checks.check_int(fn, "seed", seed, 0)
    dtype = _checks.check_float_dtype(fn, "dtype", dtype or jnp.result_type(float))
    w, m, c, labels = _fit_digits_by_class(per_class, reg_covar, seed)
    w = w / w.sum()
    c = 0.5 * (c + np.swapaxes(c, -1, -2))
    return GaussianMixture(*(jnp.asarray(a, dtype) for a in (w, m, c)), labels=labels)
