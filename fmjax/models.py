"""Flax (linen) velocity networks ``apply(params, t, x) -> (..., d)`` and time embeddings.

A model becomes a velocity field by ``functools.partial(model.apply, params)``; parameters come
from ``init(model, key=key)`` (or ``model.init(key, t, x)`` with any t and x of shape (..., d)).

Meta's ``flow_matching`` 2-D example network (input [x, t], 4 hidden layers of 512, Swish) is
``MLP(dim=2, width=512, depth=4, activation="swish", time_embedding="raw")``.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from fmjax import _checks
from fmjax._typing import PyTree

__all__ = ["ACTIVATIONS", "TIME_EMBEDDINGS", "TimeEmbedding", "MLP", "init"]

#: Activation names accepted by ``MLP`` ("swish" and "silu" are the same function).
ACTIVATIONS = {"swish": nn.swish, "silu": nn.silu, "gelu": nn.gelu, "relu": nn.relu, "elu": nn.elu}
#: "raw": [t]; "fourier": [t, sin(2 pi f t), cos(2 pi f t)] for n_frequencies f.
TIME_EMBEDDINGS = ("raw", "fourier")


def _fourier_grid(n: int, max_frequency: float) -> np.ndarray:
    """n frequencies spaced geometrically from 1 to max_frequency (cycles per unit time)."""
    if n == 1:
        return np.ones(1)
    return np.geomspace(1.0, max_frequency, n)


class TimeEmbedding(nn.Module):
    """Embed times t (...) into features (..., 1 + 2 n_frequencies): [t, sin 2pi f t, cos 2pi f t].

    Attributes:
        kind: "raw" (only t, features (..., 1)) or "fourier".
        n_frequencies: number of frequencies f for "fourier".
        max_frequency: the fixed (or initial, if learned) frequencies are geometrically spaced
            from 1 to ``max_frequency`` cycles per unit time.
        learned_frequencies: make the frequencies a trainable parameter "frequencies".
    """

    kind: str = "fourier"
    n_frequencies: int = 16
    max_frequency: float = 64.0
    learned_frequencies: bool = False

    @nn.compact
    def __call__(self, t: Float[Array, "..."]) -> Float[Array, "... e"]:
        t = t[..., None]
        if self.kind == "raw":
            return t
        grid = _fourier_grid(self.n_frequencies, self.max_frequency)
        if self.learned_frequencies:
            freqs = self.param("frequencies", lambda *_: jnp.asarray(grid, jnp.float32))
        else:
            freqs = jnp.asarray(grid, jnp.float32)
        shape = (1,) * (t.ndim - 1) + (self.n_frequencies,)
        phase = 2.0 * math.pi * t * freqs.astype(t.dtype).reshape(shape)
        return jnp.concatenate([t, jnp.sin(phase), jnp.cos(phase)], axis=-1)


class MLP(nn.Module):
    """Velocity MLP: [x, embed(t)] -> depth x (Dense(width), activation) -> Dense(dim).

    Attributes:
        dim: data dimension d (input and output size).
        width: hidden layer size.
        depth: number of hidden layers (Dense + activation), >= 1.
        activation: "swish" / "silu", "gelu", "relu" or "elu".
        time_embedding: "raw" ([x, t], as Meta's 2-D example) or "fourier" ([x, t, sin, cos]).
        n_frequencies: number of Fourier frequencies.
        max_frequency: largest fixed (initial) Fourier frequency, cycles per unit time.
        learned_frequencies: train the Fourier frequencies.
        param_dtype: dtype of the parameters (computation promotes to the input dtype).
        precision: matmul precision of the Dense layers (None: JAX's default, TF32 for float32
            on NVIDIA GPUs; "highest": full float32).

    Call: ``model.apply(params, t, x)`` with x (..., d) and t a scalar or an array broadcastable
    against x.shape[:-1]; returns (..., d). Invalid settings raise ValueError at init/apply.
    """

    dim: int
    width: int = 256
    depth: int = 4
    activation: str = "swish"
    time_embedding: str = "fourier"
    n_frequencies: int = 16
    max_frequency: float = 64.0
    learned_frequencies: bool = False
    param_dtype: jnp.dtype = jnp.float32
    precision: str | None = None

    def _check(self) -> None:
        _checks.check_choice("models.MLP", "activation", self.activation, sorted(ACTIVATIONS))
        _checks.check_choice("models.MLP", "time_embedding", self.time_embedding, TIME_EMBEDDINGS)
        for name in ("dim", "width", "depth", "n_frequencies"):
            _checks.check_int("models.MLP", name, getattr(self, name), 1)
        if not _checks.as_float("models.MLP", "max_frequency", self.max_frequency) >= 1.0:
            _checks.fail("models.MLP", "max_frequency", ">= 1", self.max_frequency)

    @nn.compact
    def __call__(
        self, t: Float[ArrayLike, "..."], x: Float[ArrayLike, "... d"]
    ) -> Float[Array, "... d"]:
        self._check()
        x = jnp.asarray(x)
        if x.ndim < 1 or x.shape[-1] != self.dim:
            _checks.fail("models.MLP", "x", f"of shape (..., {self.dim})", f"shape {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            x = x.astype(jnp.result_type(float))
        t = jnp.asarray(t, x.dtype)
        try:
            batch = jnp.broadcast_shapes(t.shape, x.shape[:-1])
        except ValueError:
            _checks.fail(
                "models.MLP", "t", f"broadcastable against x.shape[:-1] = {x.shape[:-1]}",
                f"shape {t.shape}",
            )  # fmt: skip
        x = jnp.broadcast_to(x, batch + (self.dim,))
        emb = TimeEmbedding(
            self.time_embedding,
            self.n_frequencies,
            self.max_frequency,
            self.learned_frequencies,
            name="time",
        )(jnp.broadcast_to(t, batch))
        h = jnp.concatenate([x, emb.astype(x.dtype)], axis=-1)
        act = ACTIVATIONS[self.activation]
        for i in range(self.depth):
            h = act(self._dense(self.width, f"hidden_{i}")(h))
        return self._dense(self.dim, "out")(h)

    def _dense(self, features: int, name: str) -> nn.Dense:
        return nn.Dense(features, param_dtype=self.param_dtype, precision=self.precision, name=name)


def init(model: nn.Module, *, key: PRNGKeyArray, dim: int | None = None) -> PyTree:
    """Initialise ``model``'s parameters with dummy inputs t = 0, x = zeros((1, dim)).

    Args:
        model: a module called as ``model(t, x)``, e.g. ``MLP``.
        key: PRNG key.
        dim: data dimension; defaults to ``model.dim``.

    Returns:
        the parameter pytree for ``model.apply(params, t, x)``.
    """
    dim = getattr(model, "dim", None) if dim is None else dim
    if dim is None:
        _checks.fail("models.init", "dim", "given for a model without a `dim` attribute", None)
    return model.init(key, jnp.zeros(()), jnp.zeros((1, dim)))
