"""Point-cloud checks and pairwise squared distances shared by the two-sample metrics."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fmjax import _checks

HIGHEST = jax.lax.Precision.HIGHEST


def two_clouds(fn: str, x, y, min_points: int = 1):
    """``x`` (n, d) and ``y`` (m, d) as arrays of one floating dtype, or ``ValueError``."""
    x = _checks.check_real_array(fn, "x", x, any_float=True)
    y = _checks.check_real_array(fn, "y", y, any_float=True)
    for name, a in (("x", x), ("y", y)):
        if a.ndim != 2:
            _checks.fail(fn, name, "an array of shape (n, d)", f"shape {a.shape}")
        if a.shape[0] < min_points:
            _checks.fail(fn, name, f"at least {min_points} points", f"{a.shape[0]} points")
    if x.shape[1] != y.shape[1]:
        _checks.fail(
            fn, "y", f"points of the same dimension d as `x` ({x.shape[1]})", f"shape {y.shape}"
        )
    dtype = jnp.result_type(x, y, float)
    return x.astype(dtype), y.astype(dtype)


def pairwise_sq(x, y):
    """(n, m) squared distances by one highest-precision matmul, after a common shift."""
    shift = jnp.mean(y, axis=0)
    xc, yc = x - shift[None], y - shift[None]
    d2 = (
        jnp.sum(xc * xc, axis=-1)[:, None]
        + jnp.sum(yc * yc, axis=-1)[None, :]
        - 2.0 * jnp.matmul(xc, yc.T, precision=HIGHEST)
    )
    return jnp.maximum(d2, 0.0)
