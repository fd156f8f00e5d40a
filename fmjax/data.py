"""On-device toy samplers ``sampler(key, n) -> (n, d)`` and pair samplers ``(key, n) -> (x0, x1)``.

Point samplers (2-D, jitted, ``n`` static): ``checkerboard``, ``eight_gaussians``, ``two_moons``,
``swiss_roll``, ``rings``; factories ``from_mixture(gmm)``, ``from_array(data)`` and
``gaussian_source(dim)``. Extra shape parameters are keyword-only and static.

Images: ``digits()``, scikit-learn's bundled 8x8 handwritten digits (no download; needs
``fmjax[images]``), scaled to [-1, 1], and their classes ``digits_labels()``.

Pair samplers, the ``sample_pairs`` argument of ``fmjax.losses``: ``independent_pairs(s0, s1)``
and ``coupling_pairs(joint)`` (a JointGaussianMixture's own ``.sample``).

Points on the path: ``sample_path(key, sample_pairs, schedule, n)`` draws (t, x0, x1, z, x_t) and
the conditional velocity with the one key convention that the losses, the metrics, the evaluation
and the experiments share.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

from fmjax import _checks
from fmjax._typing import PairSampler, Sampler, TimeSampler
from fmjax.mixtures import GaussianMixture, JointGaussianMixture
from fmjax.schedules import Schedule

__all__ = [
    "checkerboard",
    "eight_gaussians",
    "eight_gaussians_mixture",
    "two_moons",
    "swiss_roll",
    "rings",
    "from_mixture",
    "from_array",
    "gaussian_source",
    "independent_pairs",
    "coupling_pairs",
    "PathSample",
    "sample_path",
    "digits",
    "digits_labels",
]


def _dtype(dtype):
    return jnp.dtype(dtype) if dtype is not None else jnp.result_type(float)


@functools.partial(jax.jit, static_argnames=("n", "dtype"))
def checkerboard(key: PRNGKeyArray, n: int, *, dtype=None) -> Float[Array, "n 2"]:
    """Meta's ``flow_matching`` 2-D checkerboard: 8 squares of side 1/0.45 in [-2/.45, 2/.45)^2.

    Exactly the example's recipe: x1 = U * 4 - 2, x2_ = U' - 2 B (B in {0, 1}),
    x2 = x2_ + (floor(x1) mod 2), data = [x1, x2] / 0.45; the occupied unit squares of (x1, x2)
    are those with floor(x1) + floor(x2) even.

    Args:
        key: PRNG key.
        n: number of points (static).
        dtype: float dtype (default: the default float type).

    Returns:
        (n, 2) points.
    """
    _checks.check_key("data.checkerboard", "key", key)  # dtype and shape: fine under trace
    dtype = _dtype(dtype)
    k1, k2, k3 = jax.random.split(key, 3)
    x1 = jax.random.uniform(k1, (n,), dtype) * 4 - 2
    x2_ = jax.random.uniform(k2, (n,), dtype) - jax.random.randint(k3, (n,), 0, 2).astype(dtype) * 2
    x2 = x2_ + jnp.mod(jnp.floor(x1), 2)
    return jnp.stack([x1, x2], axis=-1) / 0.45


def eight_gaussians_mixture(
    radius: float = 4 / 1.414, std: float = 0.5 / 1.414, dtype=None
) -> GaussianMixture:
    """Eight equal isotropic Gaussians on a circle, as a GaussianMixture (exact answers exist).

    The defaults reproduce FFJORD's "8gaussians": centres 4 (cos, sin)(k pi / 4), std 0.5, all
    divided by 1.414.

    Args:
        radius: radius of the circle of centres.
        std: standard deviation of each Gaussian.
        dtype: float dtype of the points (default: JAX's default float).

    Returns:
        a ``GaussianMixture`` of 8 equal components in 2-D.
    """
    dtype = _dtype(dtype)
    theta = np.arange(8) * np.pi / 4
    means = radius * np.stack([np.cos(theta), np.sin(theta)], axis=-1)
    covs = np.broadcast_to(std**2 * np.eye(2), (8, 2, 2))
    return GaussianMixture(
        jnp.full((8,), 1 / 8, dtype), jnp.asarray(means, dtype), jnp.asarray(covs, dtype)
    )


@functools.partial(jax.jit, static_argnames=("n", "radius", "std", "dtype"))
def eight_gaussians(
    key: PRNGKeyArray, n: int, *, radius: float = 4 / 1.414, std: float = 0.5 / 1.414, dtype=None
) -> Float[Array, "n 2"]:
    """Samples of ``eight_gaussians_mixture(radius, std)``: (n, 2).

    Args:
        key: PRNG key.
        n: number of points.
        radius: radius of the circle of centres.
        std: standard deviation of each Gaussian.
        dtype: float dtype of the points (default: JAX's default float).

    Returns:
        ``(n, 2)`` points.
    """
    _checks.check_key("data.eight_gaussians", "key", key)  # dtype and shape: fine under trace
    dtype = _dtype(dtype)
    k1, k2 = jax.random.split(key)
    theta = jax.random.randint(k1, (n,), 0, 8).astype(dtype) * (math.pi / 4)
    centres = radius * jnp.stack([jnp.cos(theta), jnp.sin(theta)], axis=-1)
    return centres + std * jax.random.normal(k2, (n, 2), dtype)


@functools.partial(jax.jit, static_argnames=("n", "noise", "scale", "dtype"))
def two_moons(
    key: PRNGKeyArray, n: int, *, noise: float = 0.05, scale: float = 2.0, dtype=None
) -> Float[Array, "n 2"]:
    """Two interleaved half circles (scikit-learn's ``make_moons`` shape, random angles).

    Upper moon (cos a, sin a), lower moon (1 - cos a, 1/2 - sin a), a ~ U[0, pi], each with
    probability 1/2, plus N(0, noise^2) noise; then centred by (1/2, 1/4) and scaled by ``scale``.

    Args:
        key: PRNG key.
        n: number of points.
        noise: standard deviation of the Gaussian noise.
        scale: factor applied after centring.
        dtype: float dtype of the points (default: JAX's default float).

    Returns:
        ``(n, 2)`` points.
    """
    _checks.check_key("data.two_moons", "key", key)  # dtype and shape: fine under trace
    dtype = _dtype(dtype)
    k1, k2, k3 = jax.random.split(key, 3)
    a = jax.random.uniform(k1, (n,), dtype) * math.pi
    lower = jax.random.bernoulli(k2, 0.5, (n,))
    upper_pts = jnp.stack([jnp.cos(a), jnp.sin(a)], axis=-1)
    lower_pts = jnp.stack([1.0 - jnp.cos(a), 0.5 - jnp.sin(a)], axis=-1)
    pts = jnp.where(lower[:, None], lower_pts, upper_pts) + noise * jax.random.normal(
        k3, (n, 2), dtype
    )
    return scale * (pts - jnp.asarray([0.5, 0.25], dtype)[None])


@functools.partial(jax.jit, static_argnames=("n", "noise", "dtype"))
def swiss_roll(key: PRNGKeyArray, n: int, *, noise: float = 1.0, dtype=None) -> Float[Array, "n 2"]:
    """FFJORD's 2-D swiss roll: s (cos s, sin s) / 5 + N(0, noise^2) / 5, s ~ 1.5 pi (1 + 2 U).

    Args:
        key: PRNG key.
        n: number of points.
        noise: standard deviation of the Gaussian noise (before the division by 5).
        dtype: float dtype of the points (default: JAX's default float).

    Returns:
        ``(n, 2)`` points.
    """
    _checks.check_key("data.swiss_roll", "key", key)  # dtype and shape: fine under trace
    dtype = _dtype(dtype)
    k1, k2 = jax.random.split(key)
    s = 1.5 * math.pi * (1 + 2 * jax.random.uniform(k1, (n,), dtype))
    pts = s[:, None] * jnp.stack([jnp.cos(s), jnp.sin(s)], axis=-1)
    return (pts + noise * jax.random.normal(k2, (n, 2), dtype)) / 5.0


@functools.partial(jax.jit, static_argnames=("n", "radii", "noise", "dtype"))
def rings(
    key: PRNGKeyArray,
    n: int,
    *,
    radii: tuple[float, ...] = (0.75, 1.5, 2.25, 3.0),
    noise: float = 0.08,
    dtype=None,
) -> Float[Array, "n 2"]:
    """Concentric circles: a ring chosen uniformly, a uniform angle, radial N(0, noise^2) noise.

    Args:
        key: PRNG key.
        n: number of points.
        radii: radii of the rings.
        noise: standard deviation of the radial noise.
        dtype: float dtype of the points (default: JAX's default float).

    Returns:
        ``(n, 2)`` points.
    """
    _checks.check_key("data.rings", "key", key)  # dtype and shape: fine under trace
    dtype = _dtype(dtype)
    k1, k2, k3 = jax.random.split(key, 3)
    r = jnp.asarray(radii, dtype)[jax.random.randint(k1, (n,), 0, len(radii))]
    r = r + noise * jax.random.normal(k3, (n,), dtype)
    a = jax.random.uniform(k2, (n,), dtype) * (2 * math.pi)
    return r[:, None] * jnp.stack([jnp.cos(a), jnp.sin(a)], axis=-1)


def from_mixture(gmm: GaussianMixture) -> Sampler:
    """A jitted sampler ``(key, n) -> (n, d)`` drawing from a GaussianMixture.

    Args:
        gmm: the mixture to draw from.

    Returns:
        a sampler ``(key, n) -> (n, d)``.
    """
    _checks.check_instance("data.from_mixture", "gmm", gmm, GaussianMixture, "a GaussianMixture")
    return jax.jit(lambda key, n: gmm.sample(key, n), static_argnums=1)


def from_array(data: Float[ArrayLike, "N d"]) -> Sampler:
    """A jitted sampler ``(key, n) -> (n, d)`` drawing rows of ``data`` uniformly with replacement.

    Args:
        data: ``(N, d)`` points, drawn with replacement.

    Returns:
        a sampler ``(key, n) -> (n, d)``.

    Raises:
        ValueError: if ``data`` is not a non-empty finite 2-D float array.
    """
    arr = _checks.check_real_array("data.from_array", "data", data)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        _checks.fail("data.from_array", "data", "of shape (N >= 1, d >= 1)", f"shape {arr.shape}")
    if not np.all(np.isfinite(np.asarray(arr))):
        _checks.fail("data.from_array", "data", "finite", "NaN or inf")

    def sample(key, n):
        return arr[jax.random.randint(key, (n,), 0, arr.shape[0])]

    return jax.jit(sample, static_argnums=1)


def gaussian_source(dim: int, *, std: float = 1.0, dtype=None) -> Sampler:
    """A jitted sampler ``(key, n) -> (n, dim)`` of N(0, std^2 I).

    Args:
        dim: dimension d.
        std: standard deviation of each coordinate.
        dtype: float dtype of the points (default: JAX's default float).

    Returns:
        a sampler ``(key, n) -> (n, dim)``.
    """
    dim = _checks.check_int("data.gaussian_source", "dim", dim, 1)
    std = _checks.check_positive("data.gaussian_source", "std", std)
    dtype = _dtype(dtype)
    return jax.jit(lambda key, n: std * jax.random.normal(key, (n, dim), dtype), static_argnums=1)


def independent_pairs(sample0: Sampler, sample1: Sampler) -> PairSampler:
    """Pairs (x0, x1) from independent draws: ``sample_pairs(key, n) -> ((n, d), (n, d))``.

    Args:
        sample0: sampler ``(key, n) -> (n, d)`` of x0.
        sample1: sampler ``(key, n) -> (n, d)`` of x1.

    Returns:
        a pair sampler ``(key, n) -> (x0 (n, d), x1 (n, d))`` drawing x0 and x1 with independent
            keys.
    """
    _checks.check_callable("data.independent_pairs", "sample0", sample0, "a callable (key, n)")
    _checks.check_callable("data.independent_pairs", "sample1", sample1, "a callable (key, n)")

    def sample_pairs(key, n):
        k0, k1 = jax.random.split(key)
        return sample0(k0, n), sample1(k1, n)

    return sample_pairs


def coupling_pairs(coupling: JointGaussianMixture) -> PairSampler:
    """Pairs (x0, x1) from a JointGaussianMixture coupling (its ``.sample``).

    Args:
        coupling: the joint mixture of (X0, X1).

    Returns:
        a pair sampler ``(key, n) -> (x0 (n, d), x1 (n, d))``.
    """
    _checks.check_instance(
        "data.coupling_pairs", "coupling", coupling, JointGaussianMixture, "a JointGaussianMixture"
    )
    return jax.jit(lambda key, n: coupling.sample(key, n), static_argnums=1)


# ----------------------------------------------------------------------------- points on the path

# The key convention of ``sample_path``: pairs from split(key)[0], times from split(key)[1] and the
# latent noise z from fold_in(key, _Z_SALT). fold_in(key, i) equals split(key, n)[i] for small i,
# and a mixture's sampler splits its key again for its own noise, so a small constant would make
# z one of the draws behind x0, x1 or t (then learnable from (t, x_t)): a large salt cannot.
_Z_SALT = 0x5EED1


class PathSample(NamedTuple):
    """Points of the interpolant x_t = b_t x0 + a_t x1 + gamma_t z (``sample_path``).

    Attributes:
        t: (n,) times.
        x0: (n, d) source points.
        x1: (n, d) target points, coupled with ``x0``.
        z: (n, d) latent noise N(0, I), independent of (x0, x1), or None for a schedule without
            noise.
        xt: (n, d) the interpolant at ``t``.
        velocity: (n, d) the conditional velocity d x_t / dt = da_t x1 + db_t x0 (+ dgamma_t z),
            the regression target of conditional flow matching.
    """

    t: Float[Array, " n"]
    x0: Float[Array, "n d"]
    x1: Float[Array, "n d"]
    z: Float[Array, "n d"] | None
    xt: Float[Array, "n d"]
    velocity: Float[Array, "n d"]


def _to_interval(schedule: Schedule, u):
    """Map draws on [0, 1] onto the schedule's valid interval (identity for [0, 1])."""
    lo, hi = schedule.interval
    return u if (lo, hi) == (0.0, 1.0) else lo + (hi - lo) * u


def _uniform(key, n):
    return jax.random.uniform(key, (n,))


def sample_path(
    key: PRNGKeyArray,
    sample_pairs: PairSampler | JointGaussianMixture,
    schedule: Schedule,
    n: int,
    *,
    t: Float[ArrayLike, "*n"] | None = None,
    times: TimeSampler | None = None,
) -> PathSample:
    """Draw ``n`` points (t, x0, x1, z, x_t) of the interpolant, with one key convention.

    The pairs come from ``split(key)[0]``, the times (when drawn) from ``split(key)[1]`` and the
    latent noise z from ``fold_in(key, 0x5EED1)``, so z is independent of the pairs and the
    times whatever the pair sampler does with its key. Jit- and vmap-compatible (``n`` static).

    Args:
        key: PRNG key.
        sample_pairs: ``(key, n) -> (x0 (n, d), x1 (n, d))``, or a ``JointGaussianMixture``
            (its ``.sample``).
        schedule: the interpolant; with latent noise, x_t gains gamma_t z.
        n: number of points (static).
        t: fixed times: a scalar or (n,) array in ``schedule.interval`` (not checked here);
            then ``times`` must be None.
        times: time sampler ``(key, n) -> (n,)`` of draws on [0, 1], mapped affinely onto
            ``schedule.interval``; None: uniform. Ignored when ``t`` is given.

    Returns:
        a ``PathSample`` (t (n,), x0, x1, z or None, xt, velocity (n, d)).
    """
    return _sample_path("data.sample_path", key, sample_pairs, schedule, n, t=t, times=times)


def _sample_path(fn, key, sample_pairs, schedule, n, *, t=None, times=None) -> PathSample:
    """``sample_path`` with errors naming ``fn`` (the losses' own names)."""
    if isinstance(sample_pairs, JointGaussianMixture):
        sample_pairs = sample_pairs.sample
    _checks.check_callable(fn, "sample_pairs", sample_pairs, "a callable (key, n) -> (x0, x1)")
    _checks.check_instance(fn, "schedule", schedule, Schedule, "an fmjax Schedule")
    if t is not None and times is not None:
        _checks.fail(fn, "times", "None when fixed times `t` are given", times, TypeError)
    k_pairs, k_time = jax.random.split(key)
    pairs = sample_pairs(k_pairs, n)
    if not isinstance(pairs, tuple | list) or len(pairs) != 2:
        got = f"shape {pairs.shape}" if hasattr(pairs, "shape") else type(pairs).__name__
        what = f"a callable (key, n) -> (x0, x1), a pair of (n={n}, d) arrays"
        _checks.fail(fn, "sample_pairs", what, got, TypeError)
    x0, x1 = (jnp.asarray(p) for p in pairs)
    if x0.ndim != 2 or x0.shape[0] != n or x1.shape != x0.shape:
        raise ValueError(
            f"{fn}: `sample_pairs(key, {n})` must return two (n={n}, d) "
            f"arrays, got {x0.shape} and {x1.shape}"
        )
    x0 = _checks.check_real_array(fn, "sample_pairs", x0, any_float=True)
    x1 = _checks.check_real_array(fn, "sample_pairs", x1, x0.dtype, any_float=True)
    if t is None:
        drawn = (times or _uniform)(k_time, n)
        drawn = _checks.check_real_array(fn, "time_sampler", drawn, x0.dtype, any_float=True)
        if drawn.shape != (n,):
            raise ValueError(
                f"{fn}: `time_sampler(key, {n})` must return shape ({n},), got {drawn.shape}"
            )
        t = _to_interval(schedule, drawn.astype(x0.dtype))
    else:
        t = jnp.asarray(t, x0.dtype)
        if t.shape not in ((), (n,)):
            _checks.fail(fn, "t", f"a scalar or of shape ({n},)", f"shape {t.shape}")
        t = jnp.broadcast_to(t, (n,))
    a, b, da, db = (c[:, None] for c in schedule(t))
    xt = b * x0 + a * x1
    velocity = da * x1 + db * x0
    z = None
    if schedule.has_noise:
        z = jax.random.normal(jax.random.fold_in(key, _Z_SALT), x0.shape, x0.dtype)
        g, dg, _ = (c[:, None] for c in schedule.gamma(t))
        xt, velocity = xt + g * z, velocity + dg * z
    return PathSample(t, x0, x1, z, xt, velocity)


# ----------------------------------------------------------------------------- images


@functools.lru_cache(maxsize=1)
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    _checks.require("sklearn", "data.digits")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return np.asarray(bunch.images, np.float64), np.asarray(bunch.target, np.int32)


def digits(*, flat: bool = False, dtype=None) -> Array:
    """scikit-learn's 8x8 handwritten digits (1797 images, bundled: no download), in [-1, 1].

    The pixels are integers 0..16 in the source; they are mapped by v / 8 - 1, so the 17 grey
    levels sit 1/8 apart from -1 (background) to 1. Needs scikit-learn (``fmjax[images]``).

    Args:
        flat: images as (1797, 64) rows (row-major pixels, ``images.reshape(n, -1)``), the form
            ``fmjax.models.UNet(image_shape=(8, 8, 1))`` and the MLP take, instead of
            (1797, 8, 8, 1) (N, H, W, C).
        dtype: float dtype (default: the default float type).

    Returns:
        the images, (1797, 8, 8, 1) or (1797, 64); their classes: ``digits_labels()``.

    Raises:
        ImportError: naming ``fmjax[images]`` when scikit-learn is not installed.
    """
    dtype = _checks.check_float_dtype("data.digits", "dtype", _dtype(dtype))
    x = _load_digits()[0] / 8.0 - 1.0
    x = x.reshape(x.shape[0], -1) if flat else x[..., None]
    return jnp.asarray(x, dtype)


def digits_labels() -> Int[Array, " 1797"]:
    """The classes 0-9 (int32) of ``digits()``'s images, in the same order.

    Returns:
        ``(1797,)`` int32 classes 0-9.

    Raises:
        ImportError: naming ``fmjax[images]`` when scikit-learn is not installed.
    """
    return jnp.asarray(_load_digits()[1])
