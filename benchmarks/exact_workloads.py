"""Workloads that evaluate the exact field at many times (issue 15): exact-target training and
exact ODE sampling.

1. Training steps/s of ``losses.marginal_fm`` (exact marginal targets, one t per point) against
   ``losses.cfm`` with the same MLP, Adam, d = 16, K = 16, batch 512, MLP 3 x 256: an independent
   coupling (time-free path, detected at call time) and a joint one with cross-covariance (per
   point Cholesky path).
2. Exact ODE sampling, d = 64, K = 64, 2,000 points, 40 NFE midpoint (20 steps), linear schedule,
   standard normal source: the raw coupling (one shared t per step: K Cholesky factors per
   evaluation) against ``exact.prepare`` (time-free: no factorisation per step).

Timings are medians of a few repeats after a warm-up call (compilation excluded), on whatever
device JAX picks. Usage: ``python -m benchmarks.exact_workloads [--steps 30] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import optax

import fmjax
from fmjax import exact, losses, models, sample, schedules


def _median_time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # warm-up: compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _train_rate(loss, params, steps: int, repeats: int) -> float:
    """Steps/s of ``steps`` Adam steps in one jitted scan."""
    opt = optax.adam(1e-3)

    @jax.jit
    def run(params, key):
        def step(carry, k):
            p, s = carry
            g = jax.grad(loss)(p, k)
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        (p, _), _ = jax.lax.scan(step, (params, opt.init(params)), jax.random.split(key, steps))
        return p

    return steps / _median_time(run, params, jax.random.key(1), repeats=repeats)


def bench_training(d=16, k=16, batch=512, width=256, depth=3, steps=30, repeats=3) -> list[dict]:
    key = jax.random.key(0)
    model = models.MLP(d, width=width, depth=depth)
    params = models.init(model, key=key)
    sched = schedules.linear()
    ind = fmjax.independent_coupling(
        fmjax.standard_normal(d), fmjax.random_gaussian_mixture(key, k, d)
    )
    joint = fmjax.random_joint_mixture(jax.random.fold_in(key, 1), k, d)
    rows = []
    for name, c in (("independent", ind), ("joint", joint)):
        cfm = losses.cfm(model.apply, fmjax.data.coupling_pairs(c), sched, batch)
        mfm = losses.marginal_fm(model.apply, c, sched, batch)
        r_cfm = _train_rate(cfm, params, steps, repeats)
        r_mfm = _train_rate(mfm, params, steps, repeats)
        rows.append({"coupling": name, "cfm_steps_s": r_cfm, "marginal_fm_steps_s": r_mfm})
    return rows


def bench_sampling(d=64, k=64, n=2000, steps=20, repeats=3) -> dict:
    key = jax.random.key(0)
    c = fmjax.independent_coupling(
        fmjax.standard_normal(d), fmjax.random_gaussian_mixture(key, k, d)
    )
    sched = schedules.linear()
    x0 = jax.random.normal(jax.random.key(1), (n, d))
    out = {}
    for name, cc in (("raw", c), ("prepared", exact.prepare(c))):
        field = exact.velocity_field(cc, sched)

        @functools.partial(jax.jit)
        def run(f, x):
            return sample.ode(f, x, solver="midpoint", steps=steps).x

        out[name + "_s"] = _median_time(run, field, x0, repeats=repeats)
    t0 = time.perf_counter()
    jax.block_until_ready(exact.prepare(c).factors)
    out["prepare_s"] = time.perf_counter() - t0
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30, help="training steps per timed call")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-training", action="store_true")
    ap.add_argument("--skip-sampling", action="store_true")
    args = ap.parse_args(argv)
    print(f"device: {jax.devices()[0].device_kind}")
    if not args.skip_training:
        for r in bench_training(steps=args.steps, repeats=args.repeats):
            ratio = r["marginal_fm_steps_s"] / r["cfm_steps_s"]
            print(
                f"train d=16 K=16 batch 512 MLP 3x256, {r['coupling']:11s}: cfm "
                f"{r['cfm_steps_s']:7.1f} steps/s, marginal_fm {r['marginal_fm_steps_s']:7.1f}"
                f" steps/s ({ratio:.2f}x)"
            )
    if not args.skip_sampling:
        s = bench_sampling(repeats=args.repeats)
        print(
            f"exact ODE sampling d=64 K=64 n=2000 40 NFE midpoint: raw {s['raw_s']:.3f} s, "
            f"prepared {s['prepared_s']:.3f} s (prepare itself {s['prepare_s']:.3f} s)"
        )


if __name__ == "__main__":
    main()
