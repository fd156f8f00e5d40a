"""Type aliases shared across fmjax: one name for each kind of callable or tree the API passes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
from flax import nnx
from jaxtyping import Array, Float, PRNGKeyArray

__all__ = [
    "ApplyFn",
    "LossFn",
    "Module",
    "PairSampler",
    "Precision",
    "PyTree",
    "Sampler",
    "TimeSampler",
    "Velocity",
]

PyTree = Any
"""Any pytree of arrays (parameters, optimizer states, mixtures)."""

Velocity = Callable[[Float[Array, "..."], Float[Array, "... d"]], Float[Array, "... d"]]
"""A velocity field ``velocity(t, x) -> (..., d)`` taking t a scalar and t of shape x.shape[:-1]
(fmjax's one calling contract, checked at every entry point by ``_solve.check_field``)."""

ApplyFn = Callable[..., Float[Array, "n d"]]
"""A model's ``apply(params, t (n,), x (n, d)) -> (n, d)``."""

Module = nnx.Module | eqx.Module
"""A Flax NNX or Equinox module ``model(t (n,), x (n, d)) -> (n, d)``, trained whole by ``fit``."""

LossFn = Callable[..., Any]
"""``loss_fn(params, key) -> scalar`` or ``-> (scalar, aux)``; ``(params, key, inst)`` too."""

Sampler = Callable[[PRNGKeyArray, int], Float[Array, "n d"]]
"""``(key, n) -> (n, d)``: draws points of one distribution."""

PairSampler = Callable[[PRNGKeyArray, int], tuple[Float[Array, "n d"], Float[Array, "n d"]]]
"""``(key, n) -> (x0 (n, d), x1 (n, d))``: draws coupled pairs."""

TimeSampler = Callable[[PRNGKeyArray, int], Float[Array, " n"]]
"""``(key, n) -> t (n,)``: draws training times."""

Precision = jax.lax.Precision | jax.lax.DotAlgorithmPreset | str | None
"""A matmul precision as ``jax.lax.dot`` takes it ("highest", "default", a preset, ...)."""
