"""Bregman divergences D_F(y, y_hat) = F(y) - F(y_hat) - grad F(y_hat) . (y - y_hat).

For a strictly convex F the expected divergence E[D_F(Y, c)] is minimised by c = E[Y] and
E[D_F(Y, c)] = E[D_F(Y, E Y)] + D_F(E Y, c) (Banerjee et al., 2005): so conditional and marginal
flow matching keep the same minimiser, the same expected gradients, and the loss-floor
decomposition, for every Bregman divergence, not only the squared one. The prediction is the
second argument. Re-exported by ``fmjax.losses``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from fmjax import _checks

__all__ = ["Bregman", "bregman", "squared", "mahalanobis", "exponential", "logsumexp"]


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["params"],
    meta_fields=["name", "potential", "closed_form"],
)
@dataclasses.dataclass(frozen=True)
class Bregman:
    """A divergence ``D(y, y_hat) -> (...)`` over the last axis; the prediction is second.

    A pytree: the arrays of ``params`` (e.g. the Mahalanobis matrix) are leaves, the functions
    static, so it passes through ``jit`` as an argument. Made by ``bregman``, ``squared``,
    ``mahalanobis``, ``exponential``, ``logsumexp``.

    Attributes:
        name: human-readable name.
        potential: F(y, *params) on one vector (d,) -> scalar, or None (``closed_form`` only).
        params: arrays passed to ``potential`` / ``closed_form``.
        closed_form: ``(y, y_hat, *params) -> (...)``, used instead of autodiff when given.
    """

    name: str
    potential: Callable[..., Array] | None
    params: tuple = ()
    closed_form: Callable[..., Array] | None = None

    def F(self, y: Float[ArrayLike, "... d"]) -> Float[Array, "..."]:  # noqa: N802 - math name
        """The potential F at each vector of ``y``, (..., d) -> (...)."""
        y = jnp.asarray(y)
        flat = y.reshape(-1, y.shape[-1])
        return jax.vmap(lambda v: self.potential(v, *self.params))(flat).reshape(y.shape[:-1])

    def __call__(
        self, y: Float[ArrayLike, "... d"], y_hat: Float[ArrayLike, "... d"]
    ) -> Float[Array, "..."]:
        """D_F(y, y_hat) over the last axis, broadcast over the leading ones."""
        y, y_hat = jnp.asarray(y), jnp.asarray(y_hat)
        if self.closed_form is not None:
            return self.closed_form(y, y_hat, *self.params)
        shape = jnp.broadcast_shapes(y.shape, y_hat.shape)
        y, y_hat = jnp.broadcast_to(y, shape), jnp.broadcast_to(y_hat, shape)
        d = shape[-1]

        def one(a, b):
            fb, gb = jax.value_and_grad(self.potential)(b, *self.params)
            return self.potential(a, *self.params) - fb - jnp.dot(gb, a - b)

        out = jax.vmap(one)(y.reshape(-1, d), y_hat.reshape(-1, d))
        return out.reshape(shape[:-1])


def bregman(potential: Callable[[Array], Array], name: str = "bregman") -> Bregman:
    """The Bregman divergence of a strictly convex ``potential`` F: R^d -> R (gradient by autodiff).

    Args:
        potential: F on one vector (d,) -> scalar; strictly convex and differentiable (not
            checked: a non-convex F makes a loss whose minimiser is not the conditional mean).
        name: a name for reports.

    Returns:
        a ``Bregman`` divergence ``D(y, y_hat) -> (...)``.
    """
    _checks.check_callable("losses.bregman", "potential", potential, "a callable (d,) -> scalar")
    return Bregman(name, potential)


def _sq(y, y_hat):
    e = y - y_hat
    return jnp.sum(e * e, axis=-1)


def _sq_potential(y):
    return jnp.dot(y, y)


_SQUARED = Bregman("squared", _sq_potential, (), _sq)


def squared() -> Bregman:
    """|y - y_hat|^2 (F = |y|^2): the default loss of ``cfm`` and ``marginal_fm``."""
    return _SQUARED


def _maha(y, y_hat, m):
    e = y - y_hat
    return jnp.einsum("...i,ij,...j->...", e, m, e)


def _maha_potential(y, m):
    return y @ m @ y


def mahalanobis(matrix: Float[ArrayLike, "d d"]) -> Bregman:
    """(y - y_hat)^T M (y - y_hat) (F = y^T M y) for a symmetric positive definite M.

    Raises:
        ValueError: if M is not square, symmetric (to 1e-8 relative) and positive definite.
    """
    fn = "losses.mahalanobis"
    m = _checks.check_real_array(fn, "matrix", matrix, any_float=True)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        _checks.fail(fn, "matrix", "a square (d, d) matrix", f"shape {m.shape}")
    if _checks.is_concrete(m):
        mn = np.asarray(m, np.float64)
        scale = max(float(np.max(np.abs(mn))), 1e-300)
        if not np.all(np.isfinite(mn)) or np.max(np.abs(mn - mn.T)) > 1e-8 * scale:
            _checks.fail(fn, "matrix", "finite and symmetric", "an asymmetric matrix")
        if float(np.linalg.eigvalsh(mn).min()) <= 0:
            _checks.fail(fn, "matrix", "positive definite",
                         f"min eigenvalue {np.linalg.eigvalsh(mn).min():g}")  # fmt: skip
    return Bregman("mahalanobis", _maha_potential, (m,), _maha)


def _exp_potential(y, scale):
    return jnp.sum(jnp.exp(scale * y)) / (scale * scale)


def exponential(scale: float = 1.0) -> Bregman:
    """F(y) = sum_i exp(scale y_i) / scale^2 (strictly convex, not quadratic).

    D = sum_i [exp(s y_i) - exp(s yh_i) - s exp(s yh_i)(y_i - yh_i)] / s^2; tends to the
    squared loss / 2 as scale -> 0 and weighs errors by exp(scale * y_hat): keep |scale y|
    moderate (overflow in float32 beyond scale |y| ~ 80).
    """
    scale = _checks.check_positive("losses.exponential", "scale", scale)
    return Bregman(f"exponential({scale:g})", _exp_potential, (jnp.asarray(scale),))


def _lse_potential(y, ridge):
    return jax.nn.logsumexp(y) + 0.5 * ridge * jnp.dot(y, y)


def logsumexp(ridge: float = 0.1) -> Bregman:
    """F(y) = log sum_i exp(y_i) + ridge |y|^2 / 2 (strictly convex for ridge > 0)."""
    ridge = _checks.check_positive("losses.logsumexp", "ridge", ridge)
    return Bregman(f"logsumexp({ridge:g})", _lse_potential, (jnp.asarray(ridge),))


def as_divergence(fn: str, spec) -> Bregman:
    """None -> squared; a Bregman as is; any other callable (y, y_hat) -> (...) wrapped."""
    if spec is None:
        return _SQUARED
    if isinstance(spec, Bregman):
        return spec
    _checks.check_callable(
        fn,
        "bregman",
        spec,
        "a losses.Bregman (bregman(F), squared(), ...) or a callable (y, y_hat)",
    )
    try:
        return _custom(spec)
    except TypeError:  # an unhashable callable: a fresh wrapper (jitted callers retrace)
        return Bregman(getattr(spec, "__name__", "custom"), None, (), _Call(spec))


@functools.lru_cache(maxsize=64)
def _custom(div):
    # One wrapper per callable, so jitted code keyed on it does not retrace per call.
    return Bregman(getattr(div, "__name__", "custom"), None, (), _Call(div))


@dataclasses.dataclass(frozen=True)
class _Call:
    div: Callable

    def __call__(self, y, y_hat):
        return self.div(y, y_hat)
