"""Source samples x0 that a sampling solve starts from."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from fmjax import _checks
from fmjax.mixtures import GaussianMixture

__all__ = ["draw_source"]


def draw_source(
    key: PRNGKeyArray,
    n: int,
    dim: int | None = None,
    *,
    source: GaussianMixture | Callable[[PRNGKeyArray, int], Array] | None = None,
    dtype: jnp.dtype | None = None,
) -> Float[Array, "n d"]:
    """Draw ``n`` source samples x0 deterministically from ``key``.

    Args:
        key: PRNG key.
        n: number of samples (static).
        dim: dimension d; required for the default source, checked against the others.
        source: None for N(0, I) (``fmjax.mixtures.standard_normal(dim)``, drawn as
            ``jax.random.normal``), a ``GaussianMixture``, or a sampler ``(key, n) -> (n, d)``.
        dtype: float dtype for the default source (default: JAX's default float).

    Returns:
        (n, d) samples.

    Raises:
        TypeError: for a source of the wrong type, a non-integer ``n`` / ``dim``, or a
            ``dtype`` other than float32 / float64.
        ValueError: for ``n`` or ``dim`` < 1, a missing ``dim``, or a source of the wrong shape.
    """
    fn = "sample.draw_source"
    n = _checks.check_int(fn, "n", n)
    if dim is not None:
        dim = _checks.check_int(fn, "dim", dim)
    if source is None:
        if dim is None:
            _checks.fail(fn, "dim", "given for the default N(0, I) source", dim)
        dtype = _checks.check_float_dtype(fn, "dtype", dtype or jnp.result_type(float))
        return jax.random.normal(key, (n, dim), dtype)
    if isinstance(source, GaussianMixture):
        x = source.sample(key, n)
    else:
        what = "None, a GaussianMixture or a callable (key, n) -> (n, d)"
        x = jnp.asarray(_checks.check_callable(fn, "source", source, what)(key, n))
    if x.ndim != 2 or x.shape[0] != n or (dim is not None and x.shape[1] != dim):
        want = f"({n}, {'d' if dim is None else dim})"
        _checks.fail(fn, "source", f"a sampler returning shape {want}", f"shape {x.shape}")
    return x
