"""A second call with new arrays of the same shapes compiles nothing, for every hot-path entry.

Compilations are counted by JAX's monitoring events (each XLA backend compile), so this catches
eager recompiles too (e.g. an eager ``lax.scan`` recompiles on every call), not only retraces.
"""

import functools

import jax
import pytest

import fmjax
from fmjax import exact, likelihood, models, sample, schedules

MODEL = models.MLP(2, width=16, depth=2)
MIXTURE = fmjax.random_joint_mixture(jax.random.key(0), 3, 2)


def _exact(params, x):
    del params
    return exact.evaluate(MIXTURE, schedules.cosine(), 0.3, x, ("velocity", "log_prob"))


def _ode(params, x):
    return sample.ode(functools.partial(MODEL.apply, params), x, solver="midpoint", steps=4).x


def _adaptive_ode(params, x):
    return sample.ode(functools.partial(MODEL.apply, params), x, rtol=1e-3, atol=1e-3).x


def _sde(params, x):
    velocity = functools.partial(MODEL.apply, params)
    return sample.sde(velocity, schedules.linear(), x, jax.random.key(1), diffusion=0.5, steps=4).x


def _log_likelihood(params, x):
    velocity = functools.partial(MODEL.apply, params)
    return likelihood.log_likelihood(velocity, x, solver="midpoint", steps=4).log_prob


@pytest.mark.parametrize(
    "entry", [_exact, _ode, _adaptive_ode, _sde, _log_likelihood], ids=lambda f: f.__name__
)
def test_second_call_compiles_nothing(entry, count_compiles):
    params = [models.init(MODEL, jax.random.key(s)) for s in (0, 1)]
    xs = [jax.random.normal(jax.random.key(s), (32, 2)) for s in (2, 3)]
    with count_compiles() as first:
        jax.block_until_ready(entry(params[0], xs[0]))
    with count_compiles() as second:
        jax.block_until_ready(entry(params[1], xs[1]))
    assert first.n > 0  # the counter sees compiles at all
    assert second.n == 0
