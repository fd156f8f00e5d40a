"""Flax (linen) velocity networks ``apply(params, t, x) -> (..., d)`` and time embeddings.

A model becomes a velocity field by ``functools.partial(model.apply, params)``; parameters come
from ``init(model, key=key)`` (or ``model.init(key, t, x)`` with any t and x of shape (..., d)).

Meta's ``flow_matching`` 2-D example network (input [x, t], 4 hidden layers of 512, Swish) is
``MLP(dim=2, width=512, depth=4, activation="swish", time_embedding="raw")``.

``UNet`` is a small convolutional network for images of shape ``image_shape = (H, W, C)``. It
takes and returns *flat* points x (..., H*W*C) and reshapes to images inside, so it is a velocity
field ``(t, x)`` like the MLP and ``fmjax.fit``, ``fmjax.sample.*``, ``fmjax.likelihood.*`` and
``fmjax.metrics.*`` use it unchanged (reshape samples with ``x.reshape(-1, H, W, C)`` to view
them).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from fmjax import _checks
from fmjax._typing import PyTree

__all__ = [
    "ACTIVATIONS",
    "TIME_EMBEDDINGS",
    "TimeEmbedding",
    "MLP",
    "SinusoidalEmbedding",
    "UNet",
    "init",
]

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
        num_classes: None (unconditional) or the number of classes C: a learned class
            embedding (width ``width``) joins the input, ``y`` in 0..C-1, and ``y=None`` or
            ``y = C`` is the null class of classifier-free guidance (as ``UNet``).

    Call: ``model.apply(params, t, x)`` (``model.apply(params, t, x, y)`` with ``num_classes``)
    with x (..., d) and t a scalar or an array broadcastable against x.shape[:-1]; returns
    (..., d). Invalid settings raise ValueError at init/apply.
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
    num_classes: int | None = None

    def _check(self) -> None:
        if self.num_classes is not None:
            _checks.check_int("models.MLP", "num_classes", self.num_classes, 1)
        _checks.check_choice("models.MLP", "activation", self.activation, sorted(ACTIVATIONS))
        _checks.check_choice("models.MLP", "time_embedding", self.time_embedding, TIME_EMBEDDINGS)
        for name in ("dim", "width", "depth", "n_frequencies"):
            _checks.check_int("models.MLP", name, getattr(self, name), 1)
        if not _checks.as_float("models.MLP", "max_frequency", self.max_frequency) >= 1.0:
            _checks.fail("models.MLP", "max_frequency", ">= 1", self.max_frequency)

    @nn.compact
    def __call__(
        self,
        t: Float[ArrayLike, "..."],
        x: Float[ArrayLike, "... d"],
        y: ArrayLike | None = None,
    ) -> Float[Array, "... d"]:
        self._check()
        t, x, batch = _batch("models.MLP", t, x, self.dim)
        emb = TimeEmbedding(
            self.time_embedding,
            self.n_frequencies,
            self.max_frequency,
            self.learned_frequencies,
            name="time",
        )(t)
        h = jnp.concatenate([x, emb.astype(x.dtype)], axis=-1)
        if self.num_classes is not None:
            null = self.num_classes
            labels = jnp.full(batch, null, jnp.int32) if y is None else jnp.asarray(y, jnp.int32)
            table = nn.Embed(null + 1, self.width, param_dtype=self.param_dtype, name="classes")
            h = jnp.concatenate([h, table(jnp.broadcast_to(labels, batch)).astype(x.dtype)], -1)
        elif y is not None:
            _checks.fail("models.MLP", "y", "None for a model without num_classes", "labels")
        act = ACTIVATIONS[self.activation]
        for i in range(self.depth):
            h = act(self._dense(self.width, f"hidden_{i}")(h))
        return self._dense(self.dim, "out")(h)

    def _dense(self, features: int, name: str) -> nn.Dense:
        return nn.Dense(features, param_dtype=self.param_dtype, precision=self.precision, name=name)


def _batch(fn: str, t, x, dim: int):
    """(t broadcast to the batch shape, x as a float array, batch shape) for a flat field."""
    x = jnp.asarray(x)
    if x.ndim < 1 or x.shape[-1] != dim:
        _checks.fail(fn, "x", f"of shape (..., {dim})", f"shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    t = jnp.asarray(t, x.dtype)
    try:
        batch = jnp.broadcast_shapes(t.shape, x.shape[:-1])
    except ValueError:
        _checks.fail(fn, "t", f"broadcastable against x.shape[:-1] = {x.shape[:-1]}",
                     f"shape {t.shape}")  # fmt: skip
    return jnp.broadcast_to(t, batch), jnp.broadcast_to(x, batch + (dim,)), batch


class SinusoidalEmbedding(nn.Module):
    """Transformer / DDPM sinusoidal embedding of t (...) into (..., dim) features.

    features = [sin(scale t w_i), cos(scale t w_i)], w_i = max_period^(-i / (dim / 2)),
    i = 0 .. dim/2 - 1. With t in [0, 1], ``scale = 1000`` spreads the times like the integer
    diffusion steps the embedding was designed for.

    Attributes:
        dim: even number of features.
        max_period: the longest period, in units of ``scale * t``.
        scale: multiplies t before the embedding.
    """

    dim: int = 64
    max_period: float = 10_000.0
    scale: float = 1000.0

    @nn.compact
    def __call__(self, t: Float[Array, "..."]) -> Float[Array, "... e"]:
        if _checks.check_int("models.SinusoidalEmbedding", "dim", self.dim, 2) % 2:
            _checks.fail("models.SinusoidalEmbedding", "dim", "an even int", self.dim)
        half = self.dim // 2
        freqs = np.exp(-math.log(self.max_period) * np.arange(half) / half)
        shape = (1,) * t.ndim + (half,)
        args = self.scale * t[..., None] * jnp.asarray(freqs, t.dtype).reshape(shape)
        return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


# LeCun normal without truncation: the same scale as Flax's default, and a far smaller program
# to compile (truncated normals compile an inverse-erf per layer; the UNet has ~25 layers).
_KERNEL_INIT = nn.initializers.variance_scaling(1.0, "fan_in", "normal")


class _ResBlock(nn.Module):
    """Residual block with scale-shift conditioning (DDPM / ADM, BigGAN-style):
    GroupNorm -> SiLU -> Conv3x3; (scale, shift) = Dense(2 channels)(SiLU(embedding));
    GroupNorm * (1 + scale) + shift -> SiLU -> Conv3x3; plus a (1x1-projected) skip.

    The embedding modulates the normalised features: added before the GroupNorm instead, a
    per-channel shift is removed by the normalisation whenever a group holds one channel.
    """

    channels: int
    groups: int
    param_dtype: jnp.dtype
    precision: str | None

    @nn.compact
    def __call__(self, h, emb):
        kw = dict(param_dtype=self.param_dtype, precision=self.precision, kernel_init=_KERNEL_INIT)
        r = nn.silu(nn.GroupNorm(self._groups(h.shape[-1]), param_dtype=self.param_dtype)(h))
        r = nn.Conv(self.channels, (3, 3), **kw)(r)
        mod = nn.Dense(2 * self.channels, **kw)(nn.silu(emb))[:, None, None, :]
        scale, shift = jnp.split(mod, 2, axis=-1)
        r = nn.GroupNorm(self._groups(self.channels), param_dtype=self.param_dtype)(r)
        r = nn.silu(r * (1.0 + scale) + shift)
        r = nn.Conv(self.channels, (3, 3), **kw)(r)
        if h.shape[-1] != self.channels:
            h = nn.Conv(self.channels, (1, 1), **kw)(h)
        return h + r

    def _groups(self, channels: int) -> int:
        return math.gcd(self.groups, channels)


class UNet(nn.Module):
    """A small image UNet used as a velocity field on *flat* points ``(t, x (..., H*W*C))``.

    Layout (DDPM-style, with ``L = len(channel_mults)`` levels): Conv3x3 to ``channels``; at
    level i, ``num_res_blocks`` residual blocks of ``channels * channel_mults[i]`` channels,
    then a stride-2 Conv (except at the last level); two middle blocks; the mirror path with
    skip connections (concatenated) and nearest-neighbour upsampling + Conv; GroupNorm, SiLU,
    Conv3x3 to C. The embedding is sinusoidal time features -> Dense(4 channels) -> SiLU ->
    Dense(4 channels), plus a learned class embedding when ``num_classes`` is set; every
    residual block maps it by Dense to a per-channel (scale, shift) applied after its second
    GroupNorm, ``norm(h) * (1 + scale) + shift`` (the scale-shift norm of DDPM / ADM), so t and
    y reach the output whatever the number of channels per group. H and W must be divisible by
    2^(L-1); the 8x8 digits take ``channel_mults=(1, 2)`` (8x8 and 4x4) or ``(1, 2, 2)``.

    Attributes:
        image_shape: (H, W, C) of one image; x has H*W*C features (``dim``), row-major, i.e.
            ``images.reshape(n, -1)``.
        channels: channels at the first level.
        channel_mults: channel multiplier per level.
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        groups: GroupNorm groups (gcd with the channel count is used).
        embedding_dim: sinusoidal time features (even).
        num_classes: None (unconditional) or the number of classes: ``y`` in 0 .. num_classes-1
            selects a learned embedding, and ``y=None`` (or ``y = num_classes``) is the "null"
            class (for classifier-free guidance).
        param_dtype: parameter dtype (computation promotes to the input dtype).
        precision: matmul / convolution precision (None: JAX's default).

    Call: ``model.apply(params, t, x, y=None)`` with x (..., H*W*C), t a scalar or an array
    broadcastable against x.shape[:-1], y None or integer labels broadcastable against that
    batch shape; returns (..., H*W*C). ``functools.partial(model.apply, params)`` is a
    velocity field; ``functools.partial(model.apply, params, y=labels)`` a conditional one.
    """

    image_shape: tuple[int, int, int] = (8, 8, 1)
    channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2)
    num_res_blocks: int = 1
    groups: int = 8
    embedding_dim: int = 64
    num_classes: int | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: str | None = None

    @property
    def dim(self) -> int:
        """Flat data dimension H * W * C."""
        return int(np.prod(self.image_shape))

    def _check(self) -> None:
        fn = "models.UNet"
        shape = self.image_shape
        if not isinstance(shape, tuple | list) or len(shape) != 3:
            _checks.fail(fn, "image_shape", "a tuple (H, W, C)", shape, TypeError)
        for v in shape:
            _checks.check_int(fn, "image_shape", v, 1)
        for name in ("channels", "num_res_blocks", "groups", "embedding_dim"):
            _checks.check_int(fn, name, getattr(self, name), 1)
        if not self.channel_mults:
            _checks.fail(fn, "channel_mults", "a non-empty tuple of ints >= 1", self.channel_mults)
        for m in self.channel_mults:
            _checks.check_int(fn, "channel_mults", m, 1)
        factor = 2 ** (len(self.channel_mults) - 1)
        if shape[0] % factor or shape[1] % factor:
            _checks.fail(fn, "image_shape", f"with H and W divisible by {factor} "
                         f"(2^(len(channel_mults) - 1))", shape)  # fmt: skip
        if self.num_classes is not None:
            _checks.check_int(fn, "num_classes", self.num_classes, 1)

    @nn.compact
    def __call__(
        self,
        t: Float[ArrayLike, "..."],
        x: Float[ArrayLike, "... d"],
        y: ArrayLike | None = None,
    ) -> Float[Array, "... d"]:
        self._check()
        t, x, batch = _batch("models.UNet", t, x, self.dim)
        kw = dict(param_dtype=self.param_dtype, precision=self.precision, kernel_init=_KERNEL_INIT)
        h_, w_, c_ = self.image_shape
        img = x.reshape((-1, h_, w_, c_))
        ch = self.channels
        emb = SinusoidalEmbedding(self.embedding_dim, name="time")(t.reshape(-1))
        emb = nn.Dense(4 * ch, **kw)(emb.astype(x.dtype))
        emb = nn.Dense(4 * ch, **kw)(nn.silu(emb))
        if self.num_classes is not None:
            null = self.num_classes
            labels = jnp.full(batch, null, jnp.int32) if y is None else jnp.asarray(y, jnp.int32)
            labels = jnp.broadcast_to(labels, batch).reshape(-1)
            table = nn.Embed(self.num_classes + 1, 4 * ch, param_dtype=self.param_dtype,
                             name="classes")  # fmt: skip
            emb = emb + table(labels).astype(emb.dtype)
        elif y is not None:
            _checks.fail("models.UNet", "y", "None for a model without num_classes", "labels")

        def block(c):
            return _ResBlock(c, self.groups, self.param_dtype, self.precision)

        h = nn.Conv(ch, (3, 3), **kw)(img)
        skips = [h]
        last = len(self.channel_mults) - 1
        for i, mult in enumerate(self.channel_mults):
            for _ in range(self.num_res_blocks):
                h = block(ch * mult)(h, emb)
                skips.append(h)
            if i < last:
                h = nn.Conv(ch * mult, (3, 3), strides=(2, 2), **kw)(h)
                skips.append(h)
        h = block(h.shape[-1])(h, emb)
        h = block(h.shape[-1])(h, emb)
        for i in reversed(range(len(self.channel_mults))):
            for _ in range(self.num_res_blocks + 1):
                h = block(ch * self.channel_mults[i])(jnp.concatenate([h, skips.pop()], -1), emb)
            if i > 0:
                n, hh, ww, cc = h.shape
                h = jax.image.resize(h, (n, 2 * hh, 2 * ww, cc), "nearest")
                h = nn.Conv(cc, (3, 3), **kw)(h)
        h = nn.silu(nn.GroupNorm(math.gcd(self.groups, h.shape[-1]),
                                 param_dtype=self.param_dtype)(h))  # fmt: skip
        out = nn.Conv(c_, (3, 3), **kw)(h)
        return out.reshape(batch + (self.dim,))


def init(model: nn.Module, *, key: PRNGKeyArray, dim: int | None = None) -> PyTree:
    """Initialise ``model``'s parameters with dummy inputs t = 0, x = zeros((1, dim)).

    An ``MLP`` (or any other module) gets Flax's own initialisers (``model.init``). A ``UNet``
    gets the same LeCun-normal scale from one random draw: kernels N(0, 1 / fan_in) (fan_in =
    the product of all but the last axis; the residual blocks' scale-shift Dense included, so t
    and y change the output from the start), class embeddings N(0, 1), biases 0 and GroupNorm
    scales 1. (Flax's per-layer initialisers take ~30 s to compile for the UNet on a CPU; this
    takes ~1 s.)

    Args:
        model: a module called as ``model(t, x)``, e.g. ``MLP`` or ``UNet`` (flat x).
        key: PRNG key.
        dim: data dimension; defaults to ``model.dim``.

    Returns:
        the parameter pytree for ``model.apply(params, t, x)``.
    """
    _checks.check_instance("models.init", "model", model, nn.Module, "a flax.linen Module")
    dim = getattr(model, "dim", None) if dim is None else dim
    if dim is None:
        _checks.fail("models.init", "dim", "given for a model without a `dim` attribute", None)
    key = _checks.check_key("models.init", "key", key)
    t, x = jnp.zeros(()), jnp.zeros((1, dim))
    if isinstance(model, UNet):
        return _init_by_shapes(model, key, t, x)
    return model.init(key, t, x)


def _init_by_shapes(model: nn.Module, key, t, x) -> PyTree:
    """Parameters of ``model`` by shape: one normal draw split over the kernels / embeddings."""
    shapes = jax.eval_shape(model.init, key, t, x)
    return _fill(shapes, key)


@jax.jit
def _fill(shapes, key):
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    names = [str(getattr(path[-1], "key", path[-1])) for path, _ in flat]
    random = [n in ("kernel", "embedding") for n in names]
    sizes = [int(np.prod(leaf.shape)) for (_, leaf), r in zip(flat, random, strict=True) if r]
    z = jax.random.normal(key, (max(1, sum(sizes)),), jnp.float32)
    parts = iter(jnp.split(z, np.cumsum(sizes)[:-1]) if sizes else [])
    leaves = []
    for name, r, (_, leaf) in zip(names, random, flat, strict=True):
        if r:
            std = 1.0 if name == "embedding" else 1.0 / math.sqrt(np.prod(leaf.shape[:-1]))
            leaves.append((std * next(parts)).reshape(leaf.shape).astype(leaf.dtype))
        elif name == "scale":
            leaves.append(jnp.ones(leaf.shape, leaf.dtype))
        else:
            leaves.append(jnp.zeros(leaf.shape, leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)
