"""Tests of fmjax.sample: ODE solver orders, NFE, round trip, score from velocity, SDE marginals.

Ground truth is the exact velocity and score of a Gaussian-mixture path (fmjax.exact) with source
p0 = N(0, I) (a one-component mixture) and a small random GMM target, d = 2.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import io_callback

import fmjax
from fmjax import sample, schedules

D = 2


def _problem(key, k=2, mean_scale=1.5, eps=0.5, dtype=jnp.float64):
    p0 = fmjax.GaussianMixture(
        jnp.ones(1, dtype), jnp.zeros((1, D), dtype), jnp.eye(D, dtype=dtype)[None]
    )
    p1 = fmjax.random_gaussian_mixture(key, k, D, mean_scale=mean_scale, eps=eps, dtype=dtype)
    return fmjax.independent_coupling(p0, p1), p1


def _energy_distance(x, y):
    """Unbiased (U-statistic) squared energy distance; mean 0 when x and y share a law."""
    m, n = x.shape[0], y.shape[0]
    dist = lambda a, b: jnp.sqrt(jnp.sum((a[:, None] - b[None]) ** 2, axis=-1))  # noqa: E731
    return (
        2 * dist(x, y).mean() - dist(x, x).sum() / (m * (m - 1)) - dist(y, y).sum() / (n * (n - 1))
    )


# ----------------------------------------------------------------------------- ODE


def test_fixed_step_orders(x64):
    """Error ratio between h and h/2 gives the order: ~1 Euler, ~2 Heun/Midpoint, ~4 RK4.

    Reference: Tsit5 at rtol = atol = 1e-12, below the smallest fixed-step error (~4e-10). The
    step pairs sit in the asymptotic regime of this smooth problem (measured slopes 0.99, 2.1,
    2.0, 4.1; RK4 reaches it late: 4.4 at 8 -> 16 steps); +-0.3 leaves margin and still tells
    every order from its neighbours.
    """
    c, _ = _problem(jax.random.key(1))
    v = functools.partial(fmjax.exact.velocity, c, schedules.linear())
    x0 = sample.draw_source(jax.random.key(0), 8, D, dtype=jnp.float64)
    ref = sample.ode(v, x0, solver="tsit5", rtol=1e-12, atol=1e-12).x
    cases = [("euler", 1, 64), ("heun", 2, 32), ("midpoint", 2, 32), ("rk4", 4, 64)]
    for name, order, n in cases:
        e1, e2 = (
            float(jnp.max(jnp.abs(sample.ode(v, x0, solver=name, steps=m).x - ref)))
            for m in (n, 2 * n)
        )
        slope = np.log2(e1 / e2)
        assert abs(slope - order) < 0.3, (name, slope, e1, e2)


def test_round_trip_and_saved_grid(x64):
    """Forward to t=1 then backward to t=0 recovers x0; the saved grid matches separate solves."""
    c, _ = _problem(jax.random.key(2))
    v = functools.partial(fmjax.exact.velocity, c, schedules.cosine())
    x0 = sample.draw_source(jax.random.key(3), 16, D, dtype=jnp.float64)
    ts = jnp.array([0.0, 0.25, 0.5, 1.0])
    fwd = sample.ode(v, x0, rtol=1e-10, atol=1e-10, save_ts=ts)
    back = sample.ode(v, fwd.x, t0=1.0, t1=0.0, rtol=1e-10, atol=1e-10)
    # Two solves at tolerance 1e-10 on an O(1) flow: the round trip is exact to ~1e-9.
    np.testing.assert_allclose(back.x, x0, atol=1e-8)
    assert fwd.xs.shape == (4, 16, D) and fwd.xs.dtype == jnp.float64
    np.testing.assert_allclose(fwd.ts, ts)
    np.testing.assert_array_equal(fwd.xs[0], x0)
    np.testing.assert_allclose(fwd.xs[-1], fwd.x, atol=1e-12)
    # The interpolated state at t = 0.5 agrees with a solve ending there (both within tolerance).
    half = sample.ode(v, x0, t1=0.5, rtol=1e-10, atol=1e-10).x
    np.testing.assert_allclose(fwd.xs[2], half, atol=1e-7)


@pytest.mark.parametrize(
    # One of each NFE formula: 1 per step, s stages per step, FSAL fixed and adaptive.
    "solver,steps",
    [("euler", 7), ("heun", 7), ("rk4", 7), ("tsit5", 7), ("dopri5", None)],
)
def test_nfe_counts_velocity_calls(solver, steps):
    """The reported NFE equals the number of velocity calls, counted by a host callback."""
    calls = []

    def count(t):
        calls.append(float(t))
        return np.zeros((), np.float32)

    def velocity(t, x):
        z = io_callback(count, jax.ShapeDtypeStruct((), jnp.float32), t, ordered=True)
        return -x * (1.0 + t) + z

    x0 = jnp.ones((5, D), jnp.float32)
    sol = sample.ode(velocity, x0, solver=solver, steps=steps, rtol=1e-4, atol=1e-4)
    jax.block_until_ready(sol.x)
    assert int(sol.nfe) == len(calls)
    assert sol.x.dtype == jnp.float32
    # dx/dt = -(1 + t) x: x(1) = exp(-1.5) x0; loose (7 Euler steps are 10% off): a solve ran.
    np.testing.assert_allclose(sol.x, np.exp(-1.5) * x0, rtol=0.15)


def test_second_call_does_not_retrace():
    traces = []

    def velocity(t, x):
        traces.append(1)  # runs while tracing only
        return -x

    x0 = jnp.ones((4, D))
    sample.ode(velocity, x0, solver="midpoint", steps=5)
    n = len(traces)
    sample.ode(velocity, 2 * x0, solver="midpoint", steps=5)
    assert n > 0 and len(traces) == n


class _TraceCounter:
    """Not a pytree: a bound counter stays one object (a list would be copied by flattening)."""

    def __init__(self):
        self.n = 0


def _scaled_decay(scale, t, x, counter):
    counter.n += 1  # runs while tracing only
    return -scale * x


def test_new_partial_with_new_arrays_does_not_retrace():
    """functools.partial velocities are traced as pytrees: new bound arrays reuse the compile."""
    counter = _TraceCounter()
    x0 = jnp.ones((4, D))
    kw = dict(solver="rk4", steps=8)
    a = sample.ode(functools.partial(_scaled_decay, jnp.array(1.0), counter=counter), x0, **kw)
    n = counter.n
    b = sample.ode(functools.partial(_scaled_decay, jnp.array(2.0), counter=counter), x0, **kw)
    assert n > 0 and counter.n == n
    # RK4 with 8 steps of dx/dt = -c x: relative error ~(c h)^4 / 120 * c, below 2e-4.
    np.testing.assert_allclose(a.x, np.exp(-1.0) * x0, rtol=2e-4)
    np.testing.assert_allclose(b.x, np.exp(-2.0) * x0, rtol=2e-4)


def test_ode_validation():
    v = lambda t, x: -x  # noqa: E731
    x0 = jnp.ones((3, D))
    with pytest.raises(ValueError, match="solver"):
        sample.ode(v, x0, solver="rk45")
    with pytest.raises(ValueError, match="steps"):
        sample.ode(v, x0, solver="euler")
    with pytest.raises(ValueError, match="t0"):
        sample.ode(v, x0, t0=1.5, steps=4, solver="euler")
    with pytest.raises(ValueError, match="save_ts"):
        sample.ode(v, x0, save_ts=[0.5, 0.2])
    with pytest.raises(ValueError, match="rtol"):
        sample.ode(v, x0, rtol=0.0)
    with pytest.raises(ValueError, match="dim"):
        sample.draw_source(jax.random.key(0), 4)


def test_draw_source_deterministic():
    p = fmjax.random_gaussian_mixture(jax.random.key(0), 3, D)
    k = jax.random.key(5)
    np.testing.assert_array_equal(sample.draw_source(k, 6, D), sample.draw_source(k, 6, D))
    np.testing.assert_array_equal(sample.draw_source(k, 6, source=p), p.sample(k, 6))
    x = sample.draw_source(k, 6, D, source=lambda key, n: jnp.zeros((n, D)))
    assert x.shape == (6, D)


# ----------------------------------------------------------------------------- score and SDE


def test_sde_zero_diffusion_is_the_ode(x64):
    """g = 0 with Euler-Maruyama is the Euler ODE on the same grid (the last step is Euler too)."""
    c, _ = _problem(jax.random.key(6))
    s = schedules.linear()
    v = functools.partial(fmjax.exact.velocity, c, s)
    x0 = sample.draw_source(jax.random.key(7), 32, D, dtype=jnp.float64)
    sde = sample.sde(
        v,
        s,
        x0,
        jax.random.key(8),
        diffusion=0.0,
        steps=40,
        save_trajectory=True,
        brownian="unsafe",
    )
    ode = sample.ode(v, x0, solver="euler", steps=40)
    np.testing.assert_allclose(sde.x, ode.x, atol=1e-12)
    assert sde.xs.shape == (41, 32, D) and int(sde.nfe) == 40
    np.testing.assert_allclose(sde.ts, np.linspace(0, 1, 41), atol=1e-12)


_N = 1000


@pytest.fixture(scope="module")
def sde_problem():
    """Target GMM, exact velocity, a reference sample and the null law of the statistic."""
    prev = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        c, p1 = _problem(jax.random.key(11), k=3, mean_scale=2.0, eps=0.3)
        ref = p1.sample(jax.random.key(12), _N)
        null = jax.lax.map(
            lambda k: _energy_distance(p1.sample(k, _N), ref),
            jax.random.split(jax.random.key(13), 20),
        )
        return c, ref, float(jnp.max(null))
    finally:
        jax.config.update("jax_enable_x64", prev)


@pytest.mark.parametrize(
    "diffusion,solver,eps,brownian",
    [
        (1.0, "euler", None, "virtual"),
        (2.0, "shark", None, "unsafe"),
        (lambda t: jnp.sqrt(2.0 * (1.0 - t)), "heun", 0.0, "unsafe"),  # g(1) = 0: no denoising
    ],
)
def test_sde_samples_match_target(x64, sde_problem, diffusion, solver, eps, brownian):
    """SDE samples at t=1 match the target mixture in energy distance.

    Bound: under "same law", ED(sde, ref) is exchangeable with the 20 null replicates
    ED(exact, ref), so it exceeds their max with probability 1/21; twice the max (observed null
    std ~2.5e-3 for n=1000, max ~1e-2) keeps false failures negligible and leaves room for the
    O(dt) discretisation bias of 100 steps, which measures below the null spread. The bound has
    power: the score of the wrong schedule (cosine for a linear path) gives ED ~0.5, 40x over.
    """
    c, ref, null_max = sde_problem
    s = schedules.linear()
    v = functools.partial(fmjax.exact.velocity, c, s)
    x0 = sample.draw_source(jax.random.key(14), _N, D, dtype=jnp.float64)
    out = sample.sde(
        v,
        s,
        x0,
        jax.random.key(15),
        diffusion=diffusion,
        solver=solver,
        eps=eps,
        steps=100,
        brownian=brownian,
    )
    assert float(_energy_distance(out.x, ref)) < 2 * null_max
    if diffusion == 1.0:
        wrong = sample.sde(v, schedules.cosine(), x0, jax.random.key(15), diffusion=1.0, steps=100)
        assert float(_energy_distance(wrong.x, ref)) > 10 * null_max


def test_reversed_time_gives_same_samples(x64):
    """Data at s=0, noise at s=1 (flipped coupling, velocity dx/ds) gives the same samples."""
    c, p1 = _problem(jax.random.key(16), k=2)
    s = schedules.cosine()
    p0 = fmjax.GaussianMixture(jnp.ones(1), jnp.zeros((1, D)), jnp.eye(D)[None])
    v_fwd = functools.partial(fmjax.exact.velocity, c, s)
    # Reversed convention built independently: "x0" = data, "x1" = noise,
    # x_s = b_s data + a_s noise.
    c_rev = fmjax.independent_coupling(p1, p0)
    v_rev = functools.partial(fmjax.exact.velocity, c_rev, s)
    x0 = sample.draw_source(jax.random.key(17), 64, D, dtype=jnp.float64)
    key = jax.random.key(18)
    kw = dict(steps=30, save_trajectory=True, brownian="unsafe")
    fwd = sample.sde(v_fwd, s, x0, key, diffusion=lambda t: 0.5 + t, **kw)
    rev = sample.sde(v_rev, s, x0, key, diffusion=lambda s_: 1.5 - s_, time="reversed", **kw)
    # Same Brownian path and grid; the two exact fields agree to round-off, so do the samples.
    np.testing.assert_allclose(rev.x, fwd.x, atol=1e-9)
    np.testing.assert_allclose(rev.ts, 1.0 - fwd.ts, atol=1e-12)


def test_sde_validation():
    v = lambda t, x: -x  # noqa: E731
    s = schedules.linear()
    x0 = jnp.ones((3, D))
    k = jax.random.key(0)
    with pytest.raises(ValueError, match="diffusion"):
        sample.sde(v, s, x0, k, diffusion=1.0, eps=0.0)  # g(1) != 0 with eps = 0
    with pytest.raises(ValueError, match="diffusion"):
        sample.sde(v, s, x0, k, diffusion=lambda t: t - 0.5)
    with pytest.raises(ValueError, match="solver"):
        sample.sde(v, s, x0, k, solver="milstein")
    with pytest.raises(ValueError, match="time"):
        sample.sde(v, s, x0, k, time="backward")
    with pytest.raises(ValueError, match="schedule"):
        sample.sde(v, "linear", x0, k)
