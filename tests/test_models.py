"""Velocity MLP: shapes, broadcasting of t, the Meta 2-D config, a hand-written reference."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import models


def _np_act(name, h):
    if name in ("swish", "silu"):
        return h / (1.0 + np.exp(-h))
    if name == "relu":
        return np.maximum(h, 0.0)
    if name == "elu":
        return np.where(h > 0, h, np.expm1(np.minimum(h, 0.0)))
    raise AssertionError(name)


def _np_forward(params, t, x, depth, act, freqs=None):
    """Independent numpy forward pass of the MLP with Fourier (or raw) time features."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
    t = np.broadcast_to(np.asarray(t, np.float64), x.shape[:-1])[..., None]
    feats = [x, t]
    if freqs is not None:
        feats += [np.sin(2 * np.pi * t * freqs), np.cos(2 * np.pi * t * freqs)]
    h = np.concatenate(feats, axis=-1)
    for i in range(depth):
        layer = p[f"hidden_{i}"]
        h = _np_act(act, h @ layer["kernel"] + layer["bias"])
    return h @ p["out"]["kernel"] + p["out"]["bias"]


def test_meta_checkerboard_config(key):
    """Input [x, t], 4 hidden layers of 512, Swish: the parameter count of Meta's torch MLP."""
    model = models.MLP(dim=2, width=512, depth=4, activation="swish", time_embedding="raw")
    params = models.init(model, key=key)
    n_params = sum(a.size for a in jax.tree.leaves(params))
    # Linear(3, 512) + 3 x Linear(512, 512) + Linear(512, 2), weights and biases
    assert n_params == (3 * 512 + 512) + 3 * (512 * 512 + 512) + (512 * 2 + 2)
    x = jax.random.normal(jax.random.key(1), (7, 2))
    t = jnp.linspace(0.0, 1.0, 7)
    out = model.apply(params, t, x)
    chex.assert_shape(out, (7, 2))
    # float32 forward vs float64 numpy: errors ~1e-6 relative after 5 layers of width 512
    np.testing.assert_allclose(
        out, _np_forward(params, t, np.asarray(x, np.float64), 4, "swish"), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("act", ["silu", "relu", "elu"])
def test_fourier_forward_matches_numpy(x64, key, act):
    model = models.MLP(dim=3, width=16, depth=2, activation=act, n_frequencies=4, max_frequency=8.0)
    params = models.init(model, key=key)
    x = np.asarray(jax.random.normal(jax.random.key(2), (5, 3)))
    t = np.linspace(0.0, 1.0, 5)
    got = model.apply(params, t, x)
    assert got.dtype == jnp.float64
    want = _np_forward(params, t, x, 2, act, freqs=np.array([1.0, 2.0, 4.0, 8.0]))
    # float64 computation with float32 parameters on both sides: agreement to rounding
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


def test_t_broadcasting_and_batch_shapes(key):
    model = models.MLP(dim=2, width=8, depth=2)
    params = models.init(model, key=key)
    x = jax.random.normal(key, (4, 3, 2))
    scalar = model.apply(params, 0.3, x)
    full = model.apply(params, jnp.full((4, 3), 0.3), x)
    column = model.apply(params, jnp.full((4, 1), 0.3), x)
    chex.assert_shape(scalar, (4, 3, 2))
    np.testing.assert_array_equal(scalar, full)
    np.testing.assert_array_equal(scalar, column)
    # points are processed independently: a single point gives the same row
    np.testing.assert_allclose(model.apply(params, 0.3, x[1, 2]), scalar[1, 2], rtol=1e-6)
    with pytest.raises(ValueError, match="`t`"):
        model.apply(params, jnp.zeros(5), x)
    with pytest.raises(ValueError, match="`x`"):
        model.apply(params, 0.0, jnp.zeros((4, 3)))


def test_velocity_field_under_jit_and_vmap(key):
    model = models.MLP(dim=2, width=8, depth=1)
    params = models.init(model, key=key)
    vel = functools.partial(model.apply, params)
    x = jax.random.normal(key, (6, 2))
    t = jnp.linspace(0, 1, 6)
    direct = vel(t, x)
    np.testing.assert_allclose(jax.jit(vel)(t, x), direct, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(jax.vmap(vel)(t, x), direct, rtol=1e-6, atol=1e-6)


def test_learned_frequencies_are_trained(key):
    fixed = models.init(models.MLP(dim=2, width=8, depth=1, n_frequencies=3), key=key)
    assert "time" not in fixed["params"]
    model = models.MLP(dim=2, width=8, depth=1, n_frequencies=3, learned_frequencies=True)
    params = models.init(model, key=key)
    np.testing.assert_allclose(params["params"]["time"]["frequencies"], [1.0, 8.0, 64.0], rtol=1e-6)
    x = jax.random.normal(key, (5, 2))
    grads = jax.grad(lambda p: jnp.sum(model.apply(p, jnp.linspace(0, 1, 5), x) ** 2))(params)
    assert float(jnp.abs(grads["params"]["time"]["frequencies"]).max()) > 0.0


def test_time_embedding_values():
    emb = models.TimeEmbedding("fourier", n_frequencies=2, max_frequency=4.0)
    t = jnp.array([0.0, 0.125])
    out = emb.apply({}, t)
    want = [
        [0.0, 0.0, 0.0, 1.0, 1.0],
        [0.125, math.sin(math.pi / 4), math.sin(math.pi), math.cos(math.pi / 4), math.cos(math.pi)],
    ]
    np.testing.assert_allclose(out, want, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"activation": "tanhh"}, ValueError, "models.MLP: `activation` must be one of"),
        ({"time_embedding": "sinusoid"}, ValueError, "`time_embedding`"),
        ({"depth": 0}, ValueError, "`depth` must be an int >= 1, got 0"),
        ({"width": 2.5}, TypeError, "`width` must be an int, got 2.5"),
    ],
)
def test_invalid_settings_raise(key, kwargs, error, match):
    with pytest.raises(error, match=match):
        models.init(models.MLP(dim=2, **kwargs), key=key)
