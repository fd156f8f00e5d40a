"""Models: MLP shapes, broadcasting of t, the Meta 2-D config, a hand-written reference; the
UNet; every shipped configuration responds to t, x and y."""

import functools
import importlib
import math
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from fmjax import models

ROOT = Path(__file__).resolve().parents[1]


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


# ----------------------------------------------------------------------------- UNet

UNET = models.UNet(image_shape=(8, 8, 1), channels=8, channel_mults=(1, 2), embedding_dim=16)
# Jitted: an eager UNet call compiles each of its ~100 operations separately (slow on a CPU).
APPLY = jax.jit(UNET.apply)


@pytest.fixture(scope="module")
def unet_params():
    return models.init(UNET, key=jax.random.key(0))


def test_unet_shapes_flat_in_flat_out(unet_params):
    # Flat points (..., 64) in and out; t scalar, per point or broadcast; a single point works.
    x = jax.random.normal(jax.random.key(1), (3, 2, 64))
    out = APPLY(unet_params, 0.3, x)
    chex.assert_shape(out, (3, 2, 64))
    np.testing.assert_allclose(APPLY(unet_params, jnp.full((3, 2), 0.3), x), out, atol=1e-5)
    np.testing.assert_allclose(APPLY(unet_params, 0.3, x[1, 0]), out[1, 0], atol=1e-5)
    assert UNET.dim == 64
    with pytest.raises(ValueError, match="models.UNet: `x` must be of shape"):
        APPLY(unet_params, 0.3, jnp.zeros((3, 8, 8, 1)))  # images must be flattened
    with pytest.raises(ValueError, match="`t`"):
        APPLY(unet_params, jnp.zeros(5), x)


def test_unet_pixels_are_row_major_images(unet_params):
    # Images flattened row-major are processed as images: a one-pixel shift of the input moves
    # the output of a convolutional net; the control is the identity (no shift, same output).
    img = jax.random.normal(jax.random.key(2), (1, 8, 8, 1))
    out = APPLY(unet_params, 0.5, img.reshape(1, -1)).reshape(1, 8, 8, 1)
    again = APPLY(unet_params, 0.5, img.reshape(1, -1)).reshape(1, 8, 8, 1)
    np.testing.assert_array_equal(out, again)
    # Translation equivariance away from the borders (zero padding breaks it at the edges, the
    # stride-2 level makes it exact only for even shifts): shift by 2 pixels, compare centres.
    shifted = jnp.roll(img, 2, axis=2)
    out_s = APPLY(unet_params, 0.5, shifted.reshape(1, -1)).reshape(1, 8, 8, 1)
    assert not np.allclose(out_s, out, atol=1e-3)


def test_unet_depends_on_time_and_class(key):
    model = models.UNet(channels=8, channel_mults=(1, 2), embedding_dim=16, num_classes=10)
    params = models.init(model, key=key)
    apply = jax.jit(model.apply)
    x = jax.random.normal(jax.random.key(3), (4, 64))
    base = apply(params, 0.2, x)
    assert float(jnp.abs(apply(params, 0.8, x) - base).max()) > 1e-2  # time matters
    y = jnp.array([0, 1, 2, 3])
    cond = apply(params, 0.2, x, y)
    assert float(jnp.abs(cond - base).max()) > 1e-2  # the class matters ...
    # ... and y=None is the "null" class num_classes (classifier-free guidance)
    np.testing.assert_allclose(apply(params, 0.2, x, jnp.full(4, 10)), base, atol=1e-6)
    with pytest.raises(ValueError, match="`y` must be None"):
        APPLY(models.init(UNET, key=key), 0.2, x, y)


def test_unet_init_scale_and_determinism(unet_params):
    again = models.init(UNET, key=jax.random.key(0))
    chex.assert_trees_all_equal(unet_params, again)
    other = models.init(UNET, key=jax.random.key(1))
    conv = unet_params["params"]["Conv_0"]["kernel"]
    assert not np.allclose(conv, other["params"]["Conv_0"]["kernel"])
    # LeCun normal: std 1/sqrt(fan_in) = 1/3 for a 3x3x1 kernel (144 draws: +-0.06 at 3 sigma)
    assert conv.shape == (3, 3, 1, 8) and abs(float(jnp.std(conv)) - 1 / 3) < 0.07
    # the parameter tree is the one Flax's own init builds
    flax_shapes = jax.eval_shape(UNET.init, jax.random.key(0), jnp.zeros(()), jnp.zeros((1, 64)))
    chex.assert_trees_all_equal_shapes_and_dtypes(flax_shapes, unet_params)
    biases = [a for p, a in jax.tree_util.tree_leaves_with_path(unet_params) if p[-1].key == "bias"]
    assert biases and all(float(jnp.abs(b).max()) == 0 for b in biases)


def test_unet_under_jit_and_vmap(unet_params):
    vel = functools.partial(UNET.apply, unet_params)
    x = jax.random.normal(jax.random.key(4), (5, 64))
    t = jnp.linspace(0, 1, 5)
    direct = APPLY(unet_params, t, x)
    np.testing.assert_allclose(jax.jit(vel)(t, x), direct, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.jit(jax.vmap(vel))(t, x), direct, rtol=1e-5, atol=1e-5)


def test_unet_training_step_decreases_loss(unet_params):
    # A few Adam steps of CFM on a fixed batch of "images": the loss goes down.
    import optax

    from fmjax import losses, schedules

    x1 = jnp.tile(jnp.linspace(-1.0, 1.0, 64)[None], (32, 1))
    pairs = lambda key, n: (jax.random.normal(key, (n, 64)), x1[:n])  # noqa: E731
    loss_fn = losses.cfm(UNET.apply, pairs, schedules.linear(), 32)
    opt = optax.adam(3e-3)

    @jax.jit
    def step(params, state, key):
        loss, g = jax.value_and_grad(loss_fn)(params, key)
        upd, state = opt.update(g, state)
        return optax.apply_updates(params, upd), state, loss

    params, state = unet_params, opt.init(unet_params)
    key = jax.random.key(5)
    first = float(jax.jit(loss_fn)(params, key))
    for i in range(20):
        params, state, _ = step(params, state, jax.random.fold_in(key, i))
    assert float(jax.jit(loss_fn)(params, key)) < 0.7 * first


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"image_shape": (6, 6, 1), "channel_mults": (1, 2, 2)}, ValueError, "divisible by 4"),
        ({"channel_mults": ()}, ValueError, "`channel_mults`"),
        ({"channels": 0}, ValueError, "`channels` must be an int >= 1"),
        ({"image_shape": (8, 8)}, TypeError, "`image_shape` must be a tuple"),
    ],
)
def test_unet_invalid_settings_raise(kwargs, error, match):
    model = models.UNet(**kwargs)
    with pytest.raises(error, match=match):
        jax.eval_shape(model.init, jax.random.key(0), 0.0, jnp.zeros((1, model.dim)))


# ----------------------------------------------------------------------------- every shipped
# configuration sees its inputs: changing t (0.1 -> 0.9), x (another draw) and, for a
# class-conditional model, y (a class -> another, a class -> the null class) changes the output
# at initialisation by more than 1 % of its norm. The check is about the architecture, so the
# parameters are random (models.init).

_RESPONSE = 0.01  # |f(changed) - f| / |f|


def _experiment_models() -> dict[str, nn.Module]:
    """Every network each registered experiment trains, at its default and quick settings
    (through the experiment's own ``_models(config)``: a new experiment or preset is covered)."""
    from fmjax.experiments import registry

    out = {}
    for name, fn in registry.EXPERIMENTS.items():
        builder = importlib.import_module(fn.__module__)._models
        cls = registry.CONFIGS[name]
        for preset, cfg in (("default", cls()), ("quick", cls.quick())):
            out.update({f"{name} ({preset}): {k}": m for k, m in builder(cfg).items()})
    return out


def _train_models() -> dict[str, nn.Module]:
    """``fmjax train`` (``experiments.train_model``): default and quick, both time embeddings."""
    tm = importlib.import_module("fmjax.experiments.train_model")
    out = {}
    for preset, make in (("default", tm.TrainConfig), ("quick", tm.TrainConfig.quick)):
        for emb in ("raw", "fourier"):
            out[f"fmjax train ({preset}, {emb})"] = tm._model(make(time_embedding=emb))
    return out


def _leaderboard_models() -> dict[str, nn.Module]:
    """``fmjax evaluate --all`` with and without ``--quick``: the built-in models per problem."""
    import inspect
    from types import SimpleNamespace

    from fmjax import leaderboard, problems

    defaults = inspect.signature(leaderboard.leaderboard).parameters
    full = {k: defaults[k].default for k in ("width", "channels")}
    quick = {k: leaderboard._QUICK[k] for k in ("width", "channels")}
    out = {}
    for name in leaderboard.LEADERBOARD_PROBLEMS:
        # the models need only d and the image shape: the problem's shapes (eval_shape), not
        # its build (gmm_256 validates 64 covariances of 256 x 256; digits_gmm runs EM)
        builder, _, image_shape = problems._REGISTRY[name]
        if image_shape is None:
            dim = jax.eval_shape(lambda b=builder: b(jnp.float32)).dim
        else:
            dim = math.prod(image_shape)  # flattened images
        problem = SimpleNamespace(dim=dim, image_shape=image_shape)
        for preset, kw in (("full", full), ("quick", quick)):
            built = leaderboard._builtin_models(problem, **kw)
            out.update({f"leaderboard ({preset}) {name}: {k}": m for k, m in built.items()})
    return out


def _builtin_models() -> dict[str, nn.Module]:
    """The classes' own defaults, and class-conditional UNets: the default one and the smallest
    shipped one (quick digits: 8 channels, one level, one channel per GroupNorm group)."""
    digits = importlib.import_module("fmjax.experiments.digits")  # the module, not the function
    quick_unet = digits._models(digits.DigitsConfig.quick())["UNet"]
    return {
        "MLP defaults": models.MLP(dim=2),
        "UNet defaults": models.UNet(),
        "UNet defaults, num_classes=10": models.UNet(num_classes=10),
        "quick digits UNet, num_classes=10": quick_unet.clone(num_classes=10),
    }


def _tool_models() -> dict[str, nn.Module]:
    """The networks of the measurement scripts in ``tools/`` behind documented numbers (each
    script's ``make_model``; loading a script runs nothing else)."""
    import importlib.util

    out = {}
    for path in sorted((ROOT / "tools").glob("*.py")):
        spec = importlib.util.spec_from_file_location(f"_tool_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if hasattr(module, "make_model"):
            out[f"tools/{path.name}"] = module.make_model()
    assert len(out) >= 2, sorted(out)  # guidance_figure, schedule_change_measure
    return out


SHIPPED = {
    "experiments": _experiment_models,
    "fmjax train": _train_models,
    "leaderboard": _leaderboard_models,
    "built-in": _builtin_models,
    "tools": _tool_models,
}


def _rel(a, b) -> float:
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _responses(found: list[nn.Module]) -> list[dict[str, float]]:
    """Relative output change when t, x or y changes, per model, for randomly initialised params
    (models.init). One compiled call for all of them: separate calls cost ~1.5x the compile
    time (mostly Flax's truncated-normal init)."""
    inputs = []
    for model in found:
        x, x_other = jax.random.normal(jax.random.key(1), (2, 16, model.dim))
        xs = jnp.stack([x, x, x_other, x, x])
        ts = jnp.array([0.1, 0.9, 0.1, 0.1, 0.1])[:, None]
        if getattr(model, "num_classes", None) is None:
            inputs.append((ts[:3], xs[:3], None))
        else:  # class 3 in rows 0-2, class 4 in row 3, the null class (num_classes) in row 4
            inputs.append((ts, xs, jnp.array([0, 0, 0, 1, model.num_classes])[:, None]))

    @jax.jit
    def outputs(key):
        outs = []
        for model, (ts, xs, ys) in zip(found, inputs, strict=True):
            params = models.init(model, key=key)
            y = {} if ys is None else {"y": ys}
            outs.append(model.apply(params, ts, xs, **y))
        return outs

    rows = []
    for out in outputs(jax.random.key(0)):
        r = {"t": _rel(out[1], out[0]), "x": _rel(out[2], out[0])}
        if out.shape[0] == 5:
            r.update(y=_rel(out[3], out[0]), y_null=_rel(out[4], out[0]))
        rows.append(r)
    return rows


@pytest.fixture(scope="module")
def shipped_responses():
    """{source: {label: responses}} for every shipped model (each architecture computed once)."""
    found = {source: build() for source, build in SHIPPED.items()}
    unique = list(dict.fromkeys(m for labelled in found.values() for m in labelled.values()))
    by_model = dict(zip(unique, _responses(unique), strict=True))
    return {src: {k: by_model[m] for k, m in labelled.items()} for src, labelled in found.items()}


@pytest.mark.parametrize("source", sorted(SHIPPED))
def test_every_shipped_model_sees_its_inputs(shipped_responses, source):
    found = shipped_responses[source]
    assert found, source
    deaf = {k: r for k, r in found.items() if min(r.values()) <= _RESPONSE}
    assert not deaf, f"outputs change by <= {_RESPONSE:.0%} when an input changes: {deaf}"


def test_shipped_models_include_every_preset():
    # The collection is not silently empty: both digits UNets, the leaderboard UNets, every
    # registered experiment at both presets.
    from fmjax.experiments import registry

    labels = " | ".join(_experiment_models())
    for name in registry.EXPERIMENTS:
        assert f"{name} (default)" in labels and f"{name} (quick)" in labels
    unets = [m for m in _experiment_models().values() if isinstance(m, models.UNet)]
    shapes = {(m.channels, m.channel_mults) for m in unets}
    assert {(8, (1,)), (32, (1, 2))} <= shapes
    conditional = [m for m in unets if m.num_classes == 10]  # digits part 3, both presets
    assert len(conditional) >= 2, labels


class _AdditiveBlock(nn.Module):
    """Control only: the residual block before scale-shift conditioning, where the embedding
    was added per channel just before the second GroupNorm."""

    channels: int
    groups: int
    param_dtype: jnp.dtype
    precision: str | None

    @nn.compact
    def __call__(self, h, emb):
        kw = dict(param_dtype=self.param_dtype, precision=self.precision)
        groups = math.gcd(self.groups, self.channels)
        r = nn.silu(nn.GroupNorm(math.gcd(self.groups, h.shape[-1]))(h))
        r = nn.Conv(self.channels, (3, 3), **kw)(r)
        r = r + nn.Dense(self.channels, **kw)(nn.silu(emb))[:, None, None, :]
        r = nn.silu(nn.GroupNorm(groups)(r))
        r = nn.Conv(self.channels, (3, 3), **kw)(r)
        if h.shape[-1] != self.channels:
            h = nn.Conv(self.channels, (1, 1), **kw)(h)
        return h + r


class _AdditiveUNet(models.UNet):
    """Control only: a UNet class of its own (its compiled calls are never shared with
    ``models.UNet``'s), built with ``_AdditiveBlock`` while ``models._ResBlock`` is patched."""


def test_control_additive_conditioning_is_blind_with_one_channel_per_group(monkeypatch):
    # The old design on the quick digits UNet (8 channels, 8 groups): GroupNorm removes a
    # per-channel shift, so t and y change the output by ~1e-6 relative (float32 round-off)
    # and the check above fails; x still matters.
    monkeypatch.setattr(models, "_ResBlock", _AdditiveBlock)
    one_per_group = _AdditiveUNet(channels=8, channel_mults=(1,), embedding_dim=16, num_classes=10)
    # the same block with two channels per group does see t (the check is not too strict)
    two_per_group = _AdditiveUNet(channels=16, groups=8, channel_mults=(1,), embedding_dim=16)
    r, r2 = _responses([one_per_group, two_per_group])
    assert r["x"] > _RESPONSE
    assert max(r["t"], r["y"], r["y_null"]) < 1e-4, r
    assert min(r2.values()) > _RESPONSE, r2
