"""fmjax.fit with Flax NNX and Equinox modules passed whole, on the demo problem: BatchNorm's
running statistics are carried (they move, and the eval-mode velocity error is within 2x of a
plain MLP's; control: with the statistics reset to their initial values it is not), Dropout
trains with per-step masks drawn from the fit's key and is deterministic in eval mode, an
Equinox MLP trains, every configuration responds to t and x, checkpoints hold the carried state
(bit-identical resume), the compiled program is reused, and a params leaf that cannot be
trained is a TypeError naming `params`."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fmjax
from fmjax import losses, metrics
from fmjax.experiments import demo_problem
from fmjax.train import fingerprint, modules

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

WIDTH, STEPS, BATCH, LR = 64, 300, 256, 3e-3
TS = jnp.linspace(0.05, 0.95, 10)


def _features(t, x):
    """[x, t] with t broadcast to the points (a scalar t, as velocity_error passes, or (n,))."""
    t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:-1])[..., None]
    return jnp.concatenate([x, t], axis=-1)


class Net(nnx.Module):
    """A 2-hidden-layer NNX MLP on [x, t], with optional BatchNorm and Dropout."""

    def __init__(self, *, batch_norm=False, dropout=0.0, rngs):
        self.l1 = nnx.Linear(3, WIDTH, rngs=rngs)
        self.l2 = nnx.Linear(WIDTH, WIDTH, rngs=rngs)
        self.l3 = nnx.Linear(WIDTH, 2, rngs=rngs)
        # momentum 0.9: the running statistics follow the last ~10 steps' weights
        norm = (lambda: nnx.BatchNorm(WIDTH, momentum=0.9, rngs=rngs)) if batch_norm else None
        self.bn1 = norm() if norm else None
        self.bn2 = norm() if norm else None
        self.drop = nnx.Dropout(dropout, rngs=rngs) if dropout else None

    def __call__(self, t, x):
        h = self.l1(_features(t, x))
        h = nnx.silu(self.bn1(h) if self.bn1 is not None else h)
        h = self.drop(h) if self.drop is not None else h
        h = self.l2(h)
        h = nnx.silu(self.bn2(h) if self.bn2 is not None else h)
        return self.l3(h)


class EqxNet(eqx.Module):
    """An Equinox MLP on [x, t]; ``flip`` (an integer array or a Python int) is static."""

    mlp: eqx.nn.MLP
    flip: jax.Array | int

    def __init__(self, key, flip=1):
        self.mlp = eqx.nn.MLP(3, 2, WIDTH, 2, activation=jax.nn.silu, key=key)
        self.flip = flip

    def __call__(self, t, x):
        y = jax.vmap(self.mlp)(_features(t, x).reshape(-1, 3)).reshape(x.shape)
        return self.flip * y


def _loss():
    """One CFM loss for every module (it calls the module it is given): fits of modules of
    equal structure then share their compiled program."""
    global _LOSS
    if _LOSS is None:
        coupling, s = demo_problem()
        _LOSS = losses.cfm(EqxNet(jax.random.key(0)), coupling.sample, s, BATCH)
    return _LOSS


_LOSS = None


def _train(model, steps=STEPS, key=1, **kwargs):
    return fmjax.fit(
        _loss(), model, key=jax.random.key(key), steps=steps, learning_rate=LR,
        progress=False, **kwargs,
    )  # fmt: skip


def _error(velocity) -> float:
    """Mean over t in [0.05, 0.95] of E|v - u|^2 against the demo problem's exact field."""
    coupling, s = demo_problem()
    return float(
        metrics.velocity_error(velocity, coupling, s, TS, 512, key=jax.random.key(3)).mean()
    )


def _eval(module):
    """A copy of a trained module in eval mode (the fixtures' modules stay in train mode)."""
    copy = nnx.clone(module)
    copy.eval()
    return copy


def _reset_statistics(module):
    """Control: the running statistics back at their initial values (mean 0, var 1)."""
    copy = nnx.clone(module)
    for bn in (copy.bn1, copy.bn2):
        bn.mean[...] = jnp.zeros_like(bn.mean[...])
        bn.var[...] = jnp.ones_like(bn.var[...])
    return copy


@pytest.fixture(scope="module")
def plain():
    return _train(Net(rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def batch_norm():
    model = Net(batch_norm=True, rngs=nnx.Rngs(0))
    return model, _train(model)


@pytest.fixture(scope="module")
def dropout():
    return _train(Net(dropout=0.1, rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def equinox():
    return _train(EqxNet(jax.random.key(0)))


@pytest.fixture(scope="module")
def zero_error():
    return _error(lambda t, x: jnp.zeros_like(x))


def test_batch_norm_statistics_are_carried(plain, batch_norm, zero_error):
    model, res = batch_norm
    trained = res.params
    assert type(trained) is Net and trained is not model
    # the statistics moved away from (0, 1); the module given to fit kept its own
    moved = float(jnp.max(jnp.abs(trained.bn1.var[...] - 1.0)))
    assert moved > 0.5, moved
    np.testing.assert_array_equal(model.bn1.var[...], np.ones(WIDTH))
    # eval mode (running statistics) is as good as a plain MLP of the same size and steps
    err_plain, err_bn = _error(_eval(plain.params)), _error(_eval(trained))
    assert err_plain < 0.1 * zero_error, (err_plain, zero_error)
    assert err_bn < 2.0 * err_plain, (err_bn, err_plain)
    # control: the statistics left at their initial values (state not carried) fail the bound
    err_stuck = _error(_eval(_reset_statistics(trained)))
    assert err_stuck > 2.0 * err_plain, (err_stuck, err_plain)


def test_dropout_trains_and_eval_mode_is_deterministic(dropout, zero_error):
    losses_ = dropout.losses
    assert float(losses_[-50:].mean()) < 0.8 * float(losses_[:50].mean())
    model = _eval(dropout.params)
    assert _error(model) < 0.1 * zero_error
    t, x = jnp.full((64,), 0.5), jax.random.normal(jax.random.key(5), (64, 2))
    np.testing.assert_array_equal(model(t, x), model(t, x))
    # control: in train mode the same call draws new masks
    train_mode = nnx.clone(dropout.params)
    assert not np.array_equal(train_mode(t, x), train_mode(t, x))


def _small():
    """BatchNorm and Dropout; the short fits below share one compiled program."""
    return Net(batch_norm=True, dropout=0.2, rngs=nnx.Rngs(0))


def test_dropout_masks_come_from_the_fit_key():
    """Same key: the same run, whatever the module's own RNG streams hold (they are reseeded
    at every step); another key: other masks, hence other losses and parameters."""
    a = _train(_small(), steps=4, key=1, steps_per_call=4)
    reseeded = _small()
    nnx.reseed(reseeded, default=jax.random.key(9))  # same parameters, other RNG streams
    b = _train(reseeded, steps=4, key=1, steps_per_call=4)
    c = _train(_small(), steps=4, key=2, steps_per_call=4)
    np.testing.assert_array_equal(a.losses, b.losses)
    assert not np.array_equal(a.losses, c.losses)


def test_equinox_module_trains(equinox, zero_error):
    model = equinox.params
    assert type(model) is EqxNet and model.flip == 1
    assert float(equinox.losses[-50:].mean()) < 0.8 * float(equinox.losses[:50].mean())
    assert _error(model) < 0.1 * zero_error


def _responds(velocity):
    """Relative output change when t goes 0.1 -> 0.9, and when x moves by one unit."""
    x = jax.random.normal(jax.random.key(7), (128, 2))
    base = velocity(jnp.full((128,), 0.1), x)
    scale = float(jnp.mean(jnp.abs(base)))
    dt = float(jnp.mean(jnp.abs(velocity(jnp.full((128,), 0.9), x) - base))) / scale
    dx = float(jnp.mean(jnp.abs(velocity(jnp.full((128,), 0.1), x + 1.0) - base))) / scale
    return dt, dx


@pytest.mark.parametrize("name", ["plain", "batch_norm", "dropout", "equinox", "small"])
def test_every_module_responds_to_t_and_x(name, request):
    if name == "small":  # the short fits' configuration, as initialised
        model = _eval(_small())
    else:
        res = request.getfixturevalue(name)
        res = res[1] if name == "batch_norm" else res
        model = res.params if name == "equinox" else _eval(res.params)
    dt, dx = _responds(model)
    assert dt > 0.01 and dx > 0.01, (dt, dx)


def test_response_check_can_fail():
    """Control: a field that ignores t shows no change in t."""
    model = EqxNet(jax.random.key(0))
    dt, dx = _responds(lambda t, x: model(jnp.zeros_like(t), x))
    assert dt == 0.0 and dx > 0.01


def test_losses_take_a_module():
    """``cfm(model, ...)`` and ``marginal_fm(model, ...)`` call ``model(t, x)``: the same loss
    as with the apply function ``lambda m, t, x: m(t, x)``."""
    coupling, s = demo_problem()
    model, key = EqxNet(jax.random.key(0)), jax.random.key(4)
    apply = lambda m, t, x: m(t, x)  # noqa: E731
    for make, data in ((losses.cfm, coupling.sample), (losses.marginal_fm, coupling)):
        got = make(model, data, s, 32)(model, key)
        np.testing.assert_array_equal(got, make(apply, data, s, 32)(model, key))
    with pytest.raises(TypeError, match="`apply_fn` must be a callable apply"):
        losses.marginal_fm(3, coupling, s, 32)


def test_checkpoints_hold_the_carried_state(tmp_path):
    """Stop at step 6 and resume to 12: bit-identical to 12 straight steps, batch statistics
    included; the fingerprint describes the module and its carried state."""

    model = _small
    straight = _train(model(), steps=12, steps_per_call=4)
    _train(model(), steps=6, checkpoint_dir=tmp_path, steps_per_call=4)
    resumed = _train(model(), steps=12, checkpoint_dir=tmp_path, steps_per_call=4)
    assert resumed.resumed_from == 6
    np.testing.assert_array_equal(resumed.losses, straight.losses)
    arrays = (nnx.Param, nnx.BatchStat)
    for a, b in zip(jax.tree.leaves(nnx.state(resumed.params, arrays)),
                    jax.tree.leaves(nnx.state(straight.params, arrays)), strict=True):  # fmt: skip
        np.testing.assert_array_equal(a, b)
    # control: the statistics are not those of a fresh module
    assert not np.array_equal(resumed.params.bn1.mean[...], model().bn1.mean[...])
    spec, params, state, _ = modules.split("f", model())
    config = fmjax.train.FitConfig.create(
        "f", lambda p, k: 0.0, steps=1, optimizer=None, learning_rate=None, lr_schedule=None,
        clip_norm=None, ema_decay=None, has_aux=False, steps_per_call=1, batched=False,
        with_instances=False, mesh=None,
    )  # fmt: skip
    import dataclasses

    fp = fingerprint.fingerprint(dataclasses.replace(config, model=spec), params, jax.random.key(0),
                                 state)  # fmt: skip
    assert fp["model"].startswith("nnx Net, state") and "BatchStat" in fp["model"]
    assert "key threefry2x32[]" in fp["model"]
    assert (
        fingerprint.fingerprint(config, {"w": jnp.zeros(2)}, jax.random.key(0))["model"] == "None"
    )


def test_equal_module_reuses_the_compiled_program(equinox):
    """Another module of the fixture's structure runs its compiled program; an integer array
    is static (not trained, kept as it is), and unhashable: that module compiles anew."""
    assert equinox.compile_time > 0.0
    assert _train(EqxNet(jax.random.key(1)), steps=STEPS).compile_time == 0.0
    res = _train(EqxNet(jax.random.key(1), flip=jnp.array(-1, jnp.int32)), steps=STEPS)
    assert res.compile_time > 0.0
    assert res.params.flip.dtype == jnp.int32 and int(res.params.flip) == -1
    assert float(res.losses[-50:].mean()) < 0.8 * float(res.losses[:50].mean())


def test_ema_of_a_module_is_a_module():
    """With EMA the ema params come back as a module with the final statistics."""
    res = _train(_small(), steps=4, ema_decay=0.5, steps_per_call=4)
    assert type(res.ema_params) is Net
    np.testing.assert_array_equal(res.ema_params.bn1.mean[...], res.params.bn1.mean[...])
    assert not np.array_equal(res.ema_params.l1.kernel[...], res.params.l1.kernel[...])


@pytest.mark.parametrize(
    "params, match",
    [
        ({"w": jnp.zeros(3), "n": jnp.array(1)}, r"an array of dtype int32 at params\['n'\]"),
        ({"w": jnp.zeros(3), "n": 2}, r"a value of type int at params\['n'\]"),
        (
            {"model": EqxNet(jax.random.key(0))},
            r"module itself.*the EqxNet module inside a pytree at params\['model'\]",
        ),
        (
            nnx.state(Net(dropout=0.1, rngs=nnx.Rngs(0))),
            r"pass the NNX module itself.*uint32 at params\['drop'\]",
        ),
    ],
    ids=["int array", "int", "module in a pytree", "nnx state with keys"],
)
def test_params_that_cannot_be_trained_name_params(params, match):
    with pytest.raises(TypeError, match=r"train.fit: `params` must be a pytree of floating"):
        fmjax.fit(lambda p, k: 0.0, params, key=jax.random.key(0), steps=1, progress=False)
    with pytest.raises(TypeError, match=match):
        fmjax.fit(lambda p, k: 0.0, params, key=jax.random.key(0), steps=1, progress=False)


def test_fit_many_refuses_modules_and_float_pytrees_pass():
    model = EqxNet(jax.random.key(0))
    with pytest.raises(TypeError, match="`params_batch` must be a pytree of parameters"):
        fmjax.train.fit_many(lambda m, k: 0.0, model, keys=jax.random.split(jax.random.key(0), 2),
                             steps=1, progress=False)  # fmt: skip
    # control: float leaves (Python floats included) pass the check and train
    res = fmjax.fit(lambda p, k: (p["w"] - 1.0) ** 2 + p["b"] ** 2, {"w": 0.0, "b": jnp.ones(())},
                    key=jax.random.key(0), steps=2, progress=False)  # fmt: skip
    assert res.step == 2
