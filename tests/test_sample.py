"""Tests of fmjax.sample: ODE solver orders, NFE, round trip, score from velocity, SDE marginals,
solver and controller objects, schedule intervals, and the jit / vmap contract of ``sde``.

Ground truth is the exact velocity and score of a Gaussian-mixture path (fmjax.exact) with source
p0 = N(0, I) (``mixtures.standard_normal``) and a small random GMM target, d = 2.
"""

import functools

import chex
import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import optimistix
import pytest
from jax.experimental import io_callback

import fmjax
from fmjax import mixtures, sample, schedules

D = 2


class _Field:
    """Stand-in for ``fmjax.exact.VelocityField``: the exact field with a ``.schedule``."""

    def __init__(self, coupling, schedule):
        self.coupling, self.schedule = coupling, schedule

    def __call__(self, t, x):
        return fmjax.exact.velocity(self.coupling, self.schedule, t, x)


def _problem(key, k=2, mean_scale=1.5, eps=0.5, dtype=jnp.float64):
    p0 = mixtures.standard_normal(D, dtype)
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

    def velocity(t, x):  # both time forms (the entry check traces them; it runs no callback)
        t = jnp.broadcast_to(jnp.asarray(t)[..., None], x.shape)
        z = io_callback(count, jax.ShapeDtypeStruct((), jnp.float32), t[0, 0], ordered=True)
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
    with pytest.raises(ValueError, match=r"sample.ode: `solver`"):
        sample.ode(v, x0, solver="rk45")
    with pytest.raises(TypeError, match="`solver`"):
        sample.ode(v, x0, solver=3)
    with pytest.raises(ValueError, match="`steps`"):
        sample.ode(v, x0, solver="euler")
    with pytest.raises(ValueError, match="`t0`"):
        sample.ode(v, x0, t0=1.5, steps=4, solver="euler")
    with pytest.raises(ValueError, match="`save_ts`"):
        sample.ode(v, x0, save_ts=[0.5, 0.2])
    with pytest.raises(ValueError, match="`rtol`"):
        sample.ode(v, x0, rtol=0.0)
    with pytest.raises(TypeError, match="`steps`"):
        sample.ode(v, x0, solver="rk4", steps=4.0)
    with pytest.raises(TypeError, match="`velocity`"):
        sample.ode("v", x0)
    with pytest.raises(TypeError, match="`schedule`"):
        sample.ode(v, x0, schedule="linear")
    with pytest.raises(ValueError, match="`dim`"):
        sample.draw_source(jax.random.key(0), 4)


def test_controller_validation():
    """Controllers that do not fit the solver or ``steps`` are clear ValueErrors."""
    v = lambda t, x: -x  # noqa: E731
    x0 = jnp.ones((3, D))
    pid = diffrax.PIDController(rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="`steps`"):  # steps and a controller
        sample.ode(v, x0, steps=4, stepsize_controller=pid)
    for fixed in ("euler", "rk4", diffrax.Euler(), sample.RK4()):  # adaptive with fixed-step
        with pytest.raises(ValueError, match="`stepsize_controller`"):
            sample.ode(v, x0, solver=fixed, stepsize_controller=pid)
    with pytest.raises(ValueError, match="`stepsize_controller`"):
        sample.ode(v, x0, stepsize_controller=diffrax.ConstantStepSize())
    with pytest.raises(TypeError, match="`stepsize_controller`"):
        sample.ode(v, x0, stepsize_controller="pid")
    with pytest.raises(TypeError, match="`solver`"):  # NFE unknown for implicit solvers
        sample.ode(v, x0, solver=diffrax.Kvaerno5())


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
        key=jax.random.key(8),
        diffusion=0.0,
        steps=40,
        save_trajectory=True,
        brownian="unsafe",
    )
    ode = sample.ode(v, x0, solver="euler", steps=40)
    np.testing.assert_allclose(sde.x, ode.x, atol=1e-12)
    assert sde.xs.shape == (41, 32, D) and int(sde.nfe) == 40 and int(sde.num_steps) == 40
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
        key=jax.random.key(15),
        diffusion=diffusion,
        solver=solver,
        eps=eps,
        steps=100,
        brownian=brownian,
    )
    assert float(_energy_distance(out.x, ref)) < 2 * null_max
    if diffusion == 1.0:
        wrong = sample.sde(
            v, schedules.cosine(), x0, key=jax.random.key(15), diffusion=1.0, steps=100
        )
        assert float(_energy_distance(wrong.x, ref)) > 10 * null_max


def test_reversed_time_gives_same_samples(x64):
    """Data at s=0, noise at s=1 (flipped coupling, velocity dx/ds) gives the same samples."""
    c, p1 = _problem(jax.random.key(16), k=2)
    s = schedules.cosine()
    p0 = mixtures.standard_normal(D, jnp.float64)
    v_fwd = functools.partial(fmjax.exact.velocity, c, s)
    # Reversed convention built independently: "x0" = data, "x1" = noise,
    # x_s = b_s data + a_s noise.
    c_rev = fmjax.independent_coupling(p1, p0)
    v_rev = functools.partial(fmjax.exact.velocity, c_rev, s)
    x0 = sample.draw_source(jax.random.key(17), 64, D, dtype=jnp.float64)
    key = jax.random.key(18)
    kw = dict(steps=30, save_trajectory=True, brownian="unsafe")
    fwd = sample.sde(v_fwd, s, x0, key=key, diffusion=lambda t: 0.5 + t, **kw)
    rev = sample.sde(v_rev, s, x0, key=key, diffusion=lambda s_: 1.5 - s_, time="reversed", **kw)
    # Same Brownian path and grid; the two exact fields agree to round-off, so do the samples.
    np.testing.assert_allclose(rev.x, fwd.x, atol=1e-9)
    np.testing.assert_allclose(rev.ts, 1.0 - fwd.ts, atol=1e-12)


def test_sde_validation():
    v = lambda t, x: -x  # noqa: E731
    s = schedules.linear()
    x0 = jnp.ones((3, D))
    k = jax.random.key(0)
    with pytest.raises(ValueError, match=r"sample.sde: `diffusion`"):
        sample.sde(v, s, x0, key=k, diffusion=1.0, eps=0.0)  # g(1) != 0 with eps = 0
    with pytest.raises(ValueError, match="`diffusion`"):
        sample.sde(v, s, x0, key=k, diffusion=lambda t: t - 0.5)
    with pytest.raises(ValueError, match="`diffusion`"):
        sample.sde(v, s, x0, key=k, diffusion=-1.0)
    with pytest.raises(TypeError, match="`diffusion`"):
        sample.sde(v, s, x0, key=k, diffusion="brownian")
    with pytest.raises(ValueError, match="`solver`"):
        sample.sde(v, s, x0, key=k, solver="milstein")
    with pytest.raises(ValueError, match="`time`"):
        sample.sde(v, s, x0, key=k, time="backward")
    with pytest.raises(ValueError, match="`eps`"):
        sample.sde(v, s, x0, key=k, eps=1.0)
    with pytest.raises(TypeError, match="`schedule`"):
        sample.sde(v, "linear", x0, key=k)
    with pytest.raises(TypeError, match="`key`"):
        sample.sde(v, s, x0, key=0)
    with pytest.raises(TypeError, match="`solver`.*Tsit5"):  # an ODE solver is not an SDE one
        sample.sde(v, s, x0, key=k, solver=diffrax.Tsit5())


def test_sde_takes_diffrax_solver_objects():
    """``diffrax.ShARK()`` gives the samples of ``"shark"`` (same Levy-area path, same key) and
    reports its 2 drift evaluations per step; control: Euler's samples differ from ShARK's."""
    v = lambda t, x: -x  # noqa: E731
    s, x0, k = schedules.linear(), jnp.ones((3, D)), jax.random.key(0)
    by_name = sample.sde(v, s, x0, key=k, solver="shark", diffusion=1.0, steps=4)
    by_object = sample.sde(v, s, x0, key=k, solver=diffrax.ShARK(), diffusion=1.0, steps=4)
    np.testing.assert_array_equal(by_object.x, by_name.x)
    assert by_object.nfe == by_name.nfe == 2 * 3 + 1  # 3 SDE steps, 1 denoising step
    euler = sample.sde(v, s, x0, key=k, solver=diffrax.Euler(), diffusion=1.0, steps=4)
    assert euler.nfe == 4 and not np.allclose(euler.x, by_name.x)


def _nan_from(t0, t, x):
    """x, NaN from time t0 on (t a scalar or of shape x.shape[:-1])."""
    return jnp.where(jnp.broadcast_to(jnp.asarray(t)[..., None], x.shape) > t0, jnp.nan, x)


def _g_window(lo, hi, inside, t):
    """Diffusion 1, ``inside`` on (lo, hi)."""
    return jnp.where((t > lo) & (t < hi), inside, 1.0)


def test_sde_non_finite_samples_name_the_cause():
    """Eagerly, like sample.ode, non-finite samples raise instead of being returned: a
    ValueError naming the argument that is non-finite at the last finite state, and the step.
    The diffusion is NaN only on (0.505, 0.515), between the 33 times the eager probe of g
    checks, so only the states show it. Controls: the same fields finite pass; under jit
    nothing is checked (the NaN samples come back). The thresholds are pytree leaves
    (``jax.tree_util.Partial``): one compile per structure; the unsafe Brownian path compiles
    faster."""
    s, x0, k = schedules.linear(), jnp.ones((8, D)), jax.random.key(0)
    sde_ = functools.partial(sample.sde, key=k, brownian="unsafe")
    nan_from = lambda t0: jax.tree_util.Partial(_nan_from, jnp.asarray(t0))  # noqa: E731
    g = lambda v: jax.tree_util.Partial(_g_window, 0.505, 0.515, jnp.asarray(v))  # noqa: E731
    v = nan_from(2.0)  # finite on [0, 1]
    step = r"non-finite in step {} of 100, t in \[{}\]; the {}\w* is non-finite"
    msg = r"sample.sde: `velocity` must be finite .*" + step.format(52, "0.51, 0.52", "velocity")
    with pytest.raises(ValueError, match=msg):
        sde_(nan_from(0.505), s, x0)
    with pytest.raises(ValueError, match=r"`velocity` .*in the denoising step of 100"):
        sde_(nan_from(0.985), s, x0)  # only the last (ODE) step meets it
    assert np.isfinite(sde_(v, s, x0).x).all()  # control
    # With a score and a diffusion (one compile; the saved trajectory spares the rerun).
    sde = lambda vel, score, gv: sde_(  # noqa: E731
        vel, s, x0, score=score, diffusion=g(gv), save_trajectory=True
    )
    with pytest.raises(ValueError, match=r"`velocity` .*" + step.format(52, "0.51, 0.52", "vel")):
        sde(nan_from(0.505), v, 1.0)
    with pytest.raises(ValueError, match=r"`score` .*" + step.format(42, "0.41, 0.42", "score")):
        sde(v, nan_from(0.405), 1.0)
    with pytest.raises(ValueError, match=r"`diffusion` .*" + step.format(52, "0.51, 0.52", "diff")):
        sde(v, v, jnp.nan)
    assert np.isfinite(sde(v, v, 2.0).x).all()  # control
    jitted = jax.jit(lambda x: sde_(nan_from(0.505), s, x).x)(x0)
    assert np.isnan(jitted).all()


def test_sde_key_is_keyword_only():
    v = lambda t, x: -x  # noqa: E731
    with pytest.raises(TypeError):
        sample.sde(v, schedules.linear(), jnp.ones((3, D)), jax.random.key(0))


def test_sde_num_steps_and_interval(x64):
    """num_steps counts the SDE steps and the denoising step; the grid spans the interval.

    The vp schedule's interval is [0, 0.999]: the grid ends there, not at the singular t = 1.
    """
    c, _ = _problem(jax.random.key(20))
    s = schedules.vp()
    out = sample.sde(
        _Field(c, s),
        s,
        jnp.zeros((4, D)),
        key=jax.random.key(0),
        steps=10,
        solver="heun",
        save_trajectory=True,
    )
    assert int(out.num_steps) == 10 and int(out.nfe) == 2 * 9 + 1
    np.testing.assert_allclose(out.ts, np.linspace(0.0, s.t_max, 11), atol=1e-12)
    assert out.xs.shape == (11, 4, D) and bool(jnp.all(jnp.isfinite(out.x)))
    no_denoise = sample.sde(
        _Field(c, s),
        s,
        jnp.zeros((4, D)),
        key=jax.random.key(0),
        steps=10,
        diffusion=lambda t: s.t_max - t,
        eps=0.0,
    )
    assert int(no_denoise.num_steps) == 10 and int(no_denoise.nfe) == 10


@pytest.mark.parametrize("diffusion", [1.0, lambda t: jnp.sqrt(2.0 * (1.0 - t))])
def test_sde_under_jit_and_vmap_matches_eager(diffusion):
    """``sde`` runs inside an outer jit and vmap; the same key gives the same samples as eagerly.

    One trace of the jitted function serves new x0 and keys (``chex.assert_max_traces``).
    """
    chex.clear_trace_counter()
    c, _ = _problem(jax.random.key(21), dtype=jnp.float32)
    s = schedules.linear()
    v = functools.partial(fmjax.exact.velocity, c, s)
    kw = dict(diffusion=diffusion, steps=8)
    x0 = sample.draw_source(jax.random.key(22), 12, D).reshape(3, 4, D)
    keys = jax.random.split(jax.random.key(23), 3)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def jitted(x, key):
        return sample.sde(v, s, x, key=key, **kw).x

    eager = sample.sde(v, s, x0[0], key=keys[0], **kw).x
    # float32 in and out: the compiled and the eager solve differ by round-off only.
    np.testing.assert_allclose(jitted(x0[0], keys[0]), eager, atol=1e-5)
    jitted(2.0 * x0[1], keys[1])  # new values: no retrace
    batched = jax.jit(jax.vmap(lambda x, k: sample.sde(v, s, x, key=k, **kw).x))(x0, keys)
    for i in range(3):  # same key, same samples
        np.testing.assert_allclose(
            batched[i], sample.sde(v, s, x0[i], key=keys[i], **kw).x, atol=1e-5
        )
    # Control: a different key moves the samples (the comparisons above are not vacuous).
    other = sample.sde(v, s, x0[0], key=keys[1], **kw).x
    assert float(jnp.max(jnp.abs(other - eager))) > 1e-2


def test_ode_under_jit_matches_eager():
    chex.clear_trace_counter()
    c, _ = _problem(jax.random.key(24), dtype=jnp.float32)
    v = functools.partial(fmjax.exact.velocity, c, schedules.cosine())
    x0 = sample.draw_source(jax.random.key(25), 6, D)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def jitted(x):
        return sample.ode(v, x, rtol=1e-4, atol=1e-4).x

    eager = sample.ode(v, x0, rtol=1e-4, atol=1e-4).x
    np.testing.assert_allclose(jitted(x0), eager, atol=1e-5)
    jitted(x0 + 1.0)


# ----------------------------------------------------------------------------- objects, intervals


def test_solver_and_controller_objects_match_names(x64):
    """A diffrax solver / controller object gives exactly the solve of the matching names."""
    c, _ = _problem(jax.random.key(26))
    v = functools.partial(fmjax.exact.velocity, c, schedules.linear())
    x0 = sample.draw_source(jax.random.key(27), 8, D, dtype=jnp.float64)
    by_name = sample.ode(v, x0, rtol=1e-6, atol=1e-6)
    pid = diffrax.PIDController(rtol=1e-6, atol=1e-6, norm=optimistix.max_norm)
    by_object = sample.ode(v, x0, solver=diffrax.Tsit5(), stepsize_controller=pid)
    np.testing.assert_array_equal(by_object.x, by_name.x)
    assert int(by_object.nfe) == int(by_name.nfe) == 1 + 6 * int(by_name.num_steps)
    rk4 = sample.ode(v, x0, solver="rk4", steps=8)
    rk4_obj = sample.ode(v, x0, solver=sample.RK4(), steps=8)
    np.testing.assert_array_equal(rk4_obj.x, rk4.x)
    assert int(rk4_obj.nfe) == 32
    # A StepTo controller on the same grid is the same fixed-step solve.
    grid = diffrax.StepTo(ts=jnp.linspace(0.0, 1.0, 9))
    step_to = sample.ode(v, x0, solver=sample.RK4(), stepsize_controller=grid)
    np.testing.assert_allclose(step_to.x, rk4.x, atol=1e-14)
    # Another ERK from its tableau: Bosh3 is FSAL with 4 stages.
    bosh = sample.ode(v, x0, solver=diffrax.Bosh3(), stepsize_controller=pid)
    assert int(bosh.nfe) == 1 + 3 * int(bosh.num_steps)
    np.testing.assert_allclose(bosh.x, by_name.x, atol=1e-4)


def test_vp_exact_field_defaults_to_valid_interval(x64):
    """On the vp schedule (singular at t = 1) the default end time is t_max = 0.999.

    A velocity with ``.schedule`` (or ``schedule=``) gives finite samples equal to an explicit
    t1 = 0.999 solve, with RK4 and with the adaptive default; t1 = 1 is refused up front.
    """
    c, _ = _problem(jax.random.key(28))
    s = schedules.vp()
    field = _Field(c, s)
    x0 = sample.draw_source(jax.random.key(29), 8, D, dtype=jnp.float64)
    for kw in (dict(solver="rk4", steps=50), dict()):
        out = sample.ode(field, x0, **kw)
        assert bool(jnp.all(jnp.isfinite(out.x)))
        explicit = sample.ode(field.__call__, x0, t1=s.t_max, **kw)
        np.testing.assert_allclose(out.x, explicit.x, atol=1e-12)
        with_arg = sample.ode(field.__call__, x0, schedule=s, **kw)
        np.testing.assert_allclose(with_arg.x, explicit.x, atol=1e-12)
    with pytest.raises(ValueError, match=r"sample.ode: `t1` must be in \[0, 0.999\]"):
        sample.ode(field, x0, t1=1.0)
    with pytest.raises(ValueError, match="`t1`"):
        sample.ode(functools.partial(fmjax.exact.velocity, c, s), x0, t1=1.0, schedule=s)


@pytest.mark.parametrize("kw", [dict(solver="rk4", steps=20), dict()])
def test_singular_end_is_a_clear_error(x64, kw):
    """Without a schedule, solving the vp field to t = 1 eagerly is a ValueError naming t1.

    Before: RK4 returned non-finite samples silently and Tsit5 an opaque EquinoxRuntimeError.
    """
    c, _ = _problem(jax.random.key(30))
    v = functools.partial(fmjax.exact.velocity, c, schedules.vp())
    x0 = sample.draw_source(jax.random.key(31), 8, D, dtype=jnp.float64)
    with pytest.raises(ValueError, match=r"sample.ode: `t1` must be .*vp schedule at t = 1"):
        sample.ode(v, x0, **kw)
    # Control: the same field stopped inside its interval solves cleanly.
    assert bool(jnp.all(jnp.isfinite(sample.ode(v, x0, t1=0.999, **kw).x)))


def test_sde_one_step_names_steps():
    """steps=1 (with the default eps) used to raise ZeroDivisionError."""
    v = lambda t, x: -x  # noqa: E731
    s, x0, k = schedules.linear(), jnp.ones((3, D)), jax.random.key(0)
    with pytest.raises(ValueError, match=r"sample.sde: `steps` must be >= 2"):
        sample.sde(v, s, x0, key=k, steps=1)
    # controls: two steps, or one step without the denoising step (eps = 0, g(1) = 0)
    assert sample.sde(v, s, x0, key=k, steps=2).x.shape == (3, D)
    out = sample.sde(v, s, x0, key=k, steps=1, eps=0.0, diffusion=lambda t: 1.0 - t)
    assert out.num_steps == 1


@pytest.mark.parametrize("dtype", [jnp.complex64, jnp.float16, jnp.bfloat16])
def test_unsupported_x0_dtypes_are_a_type_error(dtype):
    """Complex x0 lost its imaginary part; float16 x0 failed in diffrax's scan carry."""
    v = lambda t, x: -x  # noqa: E731
    x0 = jnp.ones((3, D), dtype)
    with pytest.raises(TypeError, match=r"sample.ode: `x0` must be"):
        sample.ode(v, x0, steps=2, solver="euler")
    with pytest.raises(TypeError, match=r"sample.sde: `x0` must be"):
        sample.sde(v, schedules.linear(), x0, key=jax.random.key(0))
    # control: float32 and integer states
    for ok in (jnp.ones((3, D), jnp.float32), jnp.ones((3, D), jnp.int32)):
        assert sample.ode(v, ok, steps=2, solver="euler").x.dtype == jnp.float32


def test_complex_and_empty_times_and_states():
    v = lambda t, x: -x  # noqa: E731
    with pytest.raises(TypeError, match=r"sample.ode: `t1` must be a real number"):
        sample.ode(v, jnp.ones((3, D)), steps=2, solver="euler", t1=np.complex128(0.5 + 1j))
    with pytest.raises(ValueError, match=r"sample.ode: `x0` must be an array of shape \(..., d\) "):
        sample.ode(v, jnp.ones((3, 0)), steps=2, solver="euler")
    assert sample.ode(v, jnp.ones((3, D)), steps=2, solver="euler", t1=np.float64(0.5)).x.shape


def test_draw_source_refuses_float16():
    with pytest.raises(TypeError, match=r"sample.draw_source: `dtype` must be of dtype float32"):
        sample.draw_source(jax.random.key(0), 4, 2, dtype=jnp.float16)
    assert sample.draw_source(jax.random.key(0), 4, 2, dtype=jnp.float32).dtype == jnp.float32


# ----------------------------------------------------------------------------- SDE from any source


def _engine_has_gamma():
    """Whether fmjax.exact handles a schedule with noise (branch ENGINE-GAMMA merged)."""
    c = fmjax.random_joint_mixture(jax.random.key(0), 2, 2)
    noisy = schedules.linear().with_noise(schedules.brownian())
    try:
        cov = fmjax.exact.marginal(c, noisy, 0.5).covs
    except Exception:  # noqa: BLE001 - an engine without gamma may refuse the schedule
        return False
    return not np.allclose(cov, fmjax.exact.marginal(c, schedules.linear(), 0.5).covs)


def _gmm_to_gmm():
    """Source: 2 components; target: 3 well-separated components (float64)."""
    eye = jnp.eye(D)
    p0 = fmjax.GaussianMixture(
        jnp.array([0.4, 0.6]), jnp.array([[-2.0, 0.0], [1.5, 1.0]]),
        jnp.stack([0.5 * eye, jnp.array([[0.6, 0.2], [0.2, 0.3]])]),
    )  # fmt: skip
    p1 = fmjax.GaussianMixture(
        jnp.array([0.2, 0.5, 0.3]), jnp.array([[-4.0, 3.0], [0.0, -3.0], [4.0, 2.0]]),
        jnp.stack([0.3 * eye, jnp.array([[0.5, -0.2], [-0.2, 0.4]]), 0.2 * eye]),
    )  # fmt: skip
    return p0, p1, fmjax.independent_coupling(p0, p1)


def _mode_stats(p1, x):
    """Fractions, means, covariances of x split by the most responsible target component."""
    import scipy.stats

    x = np.asarray(x)
    comps = zip(*(np.asarray(a) for a in (p1.weights, p1.means, p1.covs)), strict=True)
    logp = [np.log(w) + scipy.stats.multivariate_normal(m, c).logpdf(x) for w, m, c in comps]
    lab = np.argmax(np.stack(logp, -1), -1)
    return [(np.mean(lab == k), x[lab == k].mean(0), np.cov(x[lab == k].T)) for k in range(3)]


def _check_modes(p1, x, ref, n):
    """Two-sample checks per mode, 5 standard errors: weight, mean, covariance entries."""
    ok = True
    for (w, m, c), (w_ref, m_ref, c_ref) in zip(
        _mode_stats(p1, x), _mode_stats(p1, ref), strict=True
    ):
        ok &= abs(w - w_ref) < 5 * np.sqrt(2 * w_ref * (1 - w_ref) / n)
        nk = w_ref * n
        ok &= bool(np.all(np.abs(m - m_ref) < 5 * np.sqrt(2 * np.diag(c_ref) / nk)))
        var = np.outer(np.diag(c_ref), np.diag(c_ref)) + c_ref**2  # var of a sample cov entry
        ok &= bool(np.all(np.abs(c - c_ref) < 5 * np.sqrt(2 * var / nk)))
    return ok


_NOISY_SDE = [
    schedules.linear(),
    pytest.param(
        schedules.linear().with_noise(schedules.brownian(1.0)),
        marks=pytest.mark.skipif(not _engine_has_gamma(), reason="exact engine without gamma"),
    ),
]


@pytest.mark.parametrize("sched", _NOISY_SDE, ids=lambda s: s.name)
def test_sde_with_exact_score_carries_gmm_to_gmm(x64, sched):
    """dX = [u + eps s] dt + sqrt(2 eps) dW (eps = g^2 / 2 = 0.5) with the exact drift and
    score carries a 2-component source to the 3-component target: per-mode weights, means and
    covariances of 4000 samples match 4000 exact target samples within 5 two-sample standard
    errors (200 Euler-Maruyama steps; the bias of the step is below that). Control: the score
    of the source-free N(0, I) problem (a wrong score) fails.
    """
    p0, p1, c = _gmm_to_gmm()
    n = 4000
    x0 = p0.sample(jax.random.key(30), n)
    ref = p1.sample(jax.random.key(31), n)
    u = functools.partial(fmjax.exact.velocity, c, sched)
    s = functools.partial(fmjax.exact.score, c, sched)
    kw = dict(key=jax.random.key(32), diffusion=1.0, steps=200, brownian="unsafe")
    out = sample.sde(u, sched, x0, score=s, **kw)
    assert _check_modes(p1, out.x, ref, n)
    wrong_c = fmjax.independent_coupling(mixtures.standard_normal(D, jnp.float64), p1)
    wrong = sample.sde(
        u, sched, x0, score=functools.partial(fmjax.exact.score, wrong_c, sched), **kw
    )
    assert not _check_modes(p1, wrong.x, ref, n)


def test_sde_without_score_refuses_where_it_cannot_derive_one(x64):
    p0, p1, c = _gmm_to_gmm()
    s = schedules.linear()
    x0 = jnp.zeros((4, D))
    k = jax.random.key(0)
    with pytest.raises(ValueError, match=r"sample.sde: `score` must be given"):
        sample.sde(functools.partial(fmjax.exact.velocity, c, s), s, x0, key=k)
    with pytest.raises(ValueError, match="`score`"):
        sample.sde(fmjax.exact.velocity_field(c, s), s, x0, key=k)
    noisy = s.with_noise(schedules.brownian())
    with pytest.raises(ValueError, match="latent noise"):
        sample.sde(lambda t, x: -x, noisy, x0, key=k)
    with pytest.raises(TypeError, match="`score`"):
        sample.sde(lambda t, x: -x, s, x0, key=k, score=3.0)
    # control: an N(0, I) source is accepted without a score, forward and reversed
    good = fmjax.independent_coupling(mixtures.standard_normal(D, jnp.float64), p1)
    sample.sde(functools.partial(fmjax.exact.velocity, good, s), s, x0, key=k, steps=4)
    rev = fmjax.independent_coupling(p1, mixtures.standard_normal(D, jnp.float64))
    sample.sde(fmjax.exact.velocity_field(rev, s), s, x0, key=k, steps=4, time="reversed")


def test_sde_default_diffusion(x64):
    """The default diffusion with the derived score is g(t)^2 = 2 b_t (da_t b_t - a_t db_t),
    pi cos(pi t / 2) on the cosine path, in either clock, and allows eps = 0; with a given
    score it is the constant 1. Round-off only (float64), so 1e-9; the control: g = 1 differs."""
    c, p1 = _problem(jax.random.key(40))
    s = schedules.cosine()
    v = functools.partial(fmjax.exact.velocity, c, s)
    x0 = sample.draw_source(jax.random.key(41), 32, D, dtype=jnp.float64)
    kw = dict(key=jax.random.key(42), steps=20, brownian="unsafe")
    default = sample.sde(v, s, x0, **kw).x
    g = lambda t: jnp.sqrt(jnp.pi * jnp.cos(0.5 * jnp.pi * t))  # noqa: E731
    np.testing.assert_allclose(default, sample.sde(v, s, x0, diffusion=g, **kw).x, atol=1e-9)
    assert np.abs(default - sample.sde(v, s, x0, diffusion=1.0, **kw).x).max() > 1e-2
    # Reversed clock (data at s = 0): the same g of the forward time, so the same samples.
    c_rev = fmjax.independent_coupling(p1, mixtures.standard_normal(D, jnp.float64))
    v_rev = functools.partial(fmjax.exact.velocity, c_rev, s)
    rev = sample.sde(v_rev, s, x0, time="reversed", **kw).x
    np.testing.assert_allclose(rev, default, atol=1e-9)
    # The drift u + a u - da x is finite at t_max: no denoising step needed.
    assert bool(jnp.all(jnp.isfinite(sample.sde(v, s, x0, eps=0.0, **kw).x)))
    score = functools.partial(fmjax.exact.score, c, s)
    given = sample.sde(v, s, x0, score=score, **kw).x
    np.testing.assert_allclose(given, sample.sde(v, s, x0, score=score, diffusion=1.0, **kw).x)


def test_sde_with_score_matches_derived_score(x64):
    """For an N(0, I) source, passing the exact score equals deriving it from the velocity."""
    c, _ = _problem(jax.random.key(33))
    s = schedules.cosine()
    v = functools.partial(fmjax.exact.velocity, c, s)
    x0 = sample.draw_source(jax.random.key(34), 16, D, dtype=jnp.float64)
    kw = dict(key=jax.random.key(35), diffusion=lambda t: 0.5 + t, steps=20, brownian="unsafe")
    derived = sample.sde(v, s, x0, **kw).x
    given = sample.sde(v, s, x0, score=functools.partial(fmjax.exact.score, c, s), **kw).x
    np.testing.assert_allclose(given, derived, atol=1e-8)
    # eps = 0 (no denoising step) is allowed with a given score and g(1) != 0
    out = sample.sde(v, s, x0, eps=0.0, score=functools.partial(fmjax.exact.score, c, s), **kw)
    assert bool(jnp.all(jnp.isfinite(out.x)))
