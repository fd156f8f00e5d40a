"""Workloads that evaluate the exact field at many times (issue 15): exact-target training and
exact ODE sampling, each against its peer measured in the same run.

1. Training steps/s of ``losses.marginal_fm`` (exact marginal targets) against ``losses.cfm``
   (the peer) with the same MLP and Adam, d = 16, K = 16, batch 512, MLP 3 x 256, on an
   independent coupling (time-free path, detected at call time) and on a joint one with
   cross-covariance (no time-free form): one t per point (K Cholesky factors per point) and
   ``time_groups=8`` (8 shared times per batch: K factors per group).
2. Exact ODE sampling, d = 64, K = 64, 2,000 points, 40 NFE midpoint (20 steps), linear schedule,
   standard normal source: ``exact.prepare``d (time-free: no factorisation per step) against the
   raw coupling (the peer: one shared t per step, K Cholesky factors per evaluation).

Timings: medians of ``--repeats`` calls after a warm-up call (compile time = first call minus
the median), ``block_until_ready``, on whatever device JAX picks. Roofline (benchmarks/_common):
FLOPs and bytes per timed call, counted as follows.

- training (per step): the MLP's Adam step (``training_flops_bytes``: 3x the forward matmuls)
  plus, for ``marginal_fm``, the exact target's essential work: 4 B K d^2 flops (the whitened
  coordinates and the back-transform, or the triangular solve and the cross-covariance product)
  and, without a time-free form, K d^3 / 3 per factorised covariance (B K of them with one t
  per point, G K with G groups). Bytes: the MLP's, plus 4 (2 B d + K d^2) for the target.
- sampling (per solve): 40 evaluations of 4 N K d^2 flops and 4 (2 N d + 2 K d^2) bytes.

Usage: ``python -m benchmarks.exact_workloads [--tiny] [--repeats 3] [--out FILE]``; prints a
table and writes JSON (default benchmarks/results/exact_workloads.json); part of
``python -m benchmarks``.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import optax

import fmjax
from benchmarks._common import (
    dense_layers,
    machine,
    machine_rates,
    rates_line,
    roofline_fraction,
    save_results,
    training_flops_bytes,
)
from fmjax import exact, losses, models, sample, schedules
from fmjax._report import format_table

SIZES = {
    "default": {"d": 16, "k": 16, "batch": 512, "width": 256, "depth": 3, "groups": 8,
                "steps": 30, "sd": 64, "sk": 64, "sn": 2000, "ode_steps": 20},
    "tiny": {"d": 4, "k": 4, "batch": 64, "width": 32, "depth": 2, "groups": 4,
             "steps": 2, "sd": 8, "sk": 8, "sn": 128, "ode_steps": 2},
}  # fmt: skip


def _timed(fn, *args, repeats: int) -> tuple[float, float]:
    """(first call s, median of ``repeats`` later calls s)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def _train_call(loss, params, steps: int):
    """``steps`` Adam steps in one jitted scan: the timed call."""
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

    return run


def bench_training(sz: dict, repeats: int) -> list[dict]:
    d, k, batch, steps = sz["d"], sz["k"], sz["batch"], sz["steps"]
    key = jax.random.key(0)
    model = models.MLP(d, width=sz["width"], depth=sz["depth"])
    params = models.init(model, key=key)
    mlp_flops, mlp_bytes = training_flops_bytes(dense_layers(params), batch)
    sched = schedules.linear()
    ind = fmjax.independent_coupling(
        fmjax.standard_normal(d), fmjax.random_gaussian_mixture(key, k, d)
    )
    joint = fmjax.random_joint_mixture(jax.random.fold_in(key, 1), k, d)
    target_flops = 4.0 * batch * k * d * d
    target_bytes = 4.0 * (2 * batch * d + k * d * d)
    variants = [
        ("independent", ind, "cfm", None, 0),
        ("independent", ind, "marginal_fm", None, 0),
        ("joint", joint, "cfm", None, 0),
        ("joint", joint, "marginal_fm", None, batch * k),
        ("joint", joint, "marginal_fm", sz["groups"], sz["groups"] * k),
    ]
    rows = []
    for coupling, c, loss_name, groups, n_factors in variants:
        if loss_name == "cfm":
            loss = losses.cfm(model.apply, fmjax.data.coupling_pairs(c), sched, batch)
            flops, nbytes = mlp_flops, mlp_bytes
        else:
            loss = losses.marginal_fm(model.apply, c, sched, batch, time_groups=groups)
            flops = mlp_flops + target_flops + n_factors * d**3 / 3
            nbytes = mlp_bytes + target_bytes
        first, med = _timed(_train_call(loss, params, steps), params, key, repeats=repeats)
        rows.append({
            "coupling": coupling, "loss": loss_name, "time_groups": groups, "steps": steps,
            "first_s": first, "median_s": med, "steps_per_s": steps / med,
            "flops": steps * flops, "bytes": steps * nbytes,
        })  # fmt: skip
    return rows


def bench_sampling(sz: dict, repeats: int) -> dict:
    d, k, n, steps = sz["sd"], sz["sk"], sz["sn"], sz["ode_steps"]
    key = jax.random.key(0)
    c = fmjax.independent_coupling(
        fmjax.standard_normal(d), fmjax.random_gaussian_mixture(key, k, d)
    )
    sched = schedules.linear()
    x0 = jax.random.normal(jax.random.key(1), (n, d))
    t0 = time.perf_counter()
    prepared = exact.prepare(c)
    jax.block_until_ready(prepared.factors)
    prepare_s = time.perf_counter() - t0

    @functools.partial(jax.jit)
    def run(f, x):
        return sample.ode(f, x, solver="midpoint", steps=steps).x

    out = {"d": d, "K": k, "n": n, "nfe": 2 * steps, "prepare_s": prepare_s,
           "flops": 2 * steps * 4.0 * n * k * d * d,
           "bytes": 2 * steps * 4.0 * (2 * n * d + 2 * k * d * d)}  # fmt: skip
    for name, cc in (("prepared", prepared), ("raw", c)):
        first, med = _timed(run, exact.velocity_field(cc, sched), x0, repeats=repeats)
        out[f"{name}_first_s"], out[f"{name}_s"] = first, med
    return out


def _train_workload(r: dict) -> str:
    g = f", time_groups={r['time_groups']}" if r["time_groups"] else ""
    return f"train {r['coupling']} {r['loss']}{g}"


def summary_rows(result: dict) -> list[dict]:
    """One row per workload (precision highest); peers: cfm for marginal_fm (ratio = marginal_fm
    steps/s / cfm steps/s on the same coupling), the raw coupling for prepared sampling."""
    out = []
    cfm = {r["coupling"]: r for r in result["training"] if r["loss"] == "cfm"}
    for r in result["training"]:
        row = {
            "benchmark": "exact_workloads",
            "workload": _train_workload(r),
            "precision": "highest",
            "median_s": r["median_s"],
            "compile_s": max(0.0, r["first_s"] - r["median_s"]),
            "throughput": r["steps_per_s"],
            "unit": "steps/s",
            "flops": r["flops"],
            "bytes": r["bytes"],
        }
        peer = cfm[r["coupling"]]
        if r["loss"] != "cfm":
            row.update(peer="cfm", peer_median_s=peer["median_s"],
                       peer_throughput=peer["steps_per_s"],
                       ratio=peer["median_s"] / r["median_s"])  # fmt: skip
        out.append(row)
    s = result.get("sampling")
    if s:
        out.append({
            "benchmark": "exact_workloads",
            "workload": f"exact ODE d={s['d']} K={s['K']} n={s['n']} nfe={s['nfe']}, prepared",
            "precision": "highest",
            "median_s": s["prepared_s"],
            "compile_s": max(0.0, s["prepared_first_s"] - s["prepared_s"]),
            "throughput": s["n"] / s["prepared_s"],
            "unit": "samples/s",
            "flops": s["flops"],
            "bytes": s["bytes"],
            "peer": "raw coupling",
            "peer_median_s": s["raw_s"],
            "peer_throughput": s["n"] / s["raw_s"],
            "ratio": s["raw_s"] / s["prepared_s"],
        })  # fmt: skip
    return out


_COLUMNS = [
    ("workload", "workload", ""),
    ("compile_s", "compile s", ".2f"),
    ("median_s", "median s", ".4g"),
    ("throughput", "per s", ".4g"),
    ("unit", "unit", ""),
    ("roofline_frac", "of roofline", ".1%"),
    ("peer", "peer", ""),
    ("peer_throughput", "peer per s", ".4g"),
    ("ratio", "ratio", ".2f"),
]


def main(argv=None, rates: dict | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny sizes: a check that it runs")
    ap.add_argument("--full", action="store_true", help="the issue's sizes (= default)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-training", action="store_true")
    ap.add_argument("--skip-sampling", action="store_true")
    ap.add_argument("--out", default=None, help="JSON path")
    args = ap.parse_args(argv)
    sz = SIZES["tiny" if args.tiny else "default"]
    mach = machine()
    if rates is None:
        rates = machine_rates(2048 if args.tiny else None, (1 << 24) if args.tiny else None)
    print(f"{mach['backend']} ({mach['device']}): {rates_line(rates)}", flush=True)
    result = {"machine": mach, "rates": rates, "sizes": sz, "training": [], "sampling": None}
    if not args.skip_training:
        result["training"] = bench_training(sz, args.repeats)
    if not args.skip_sampling:
        result["sampling"] = bench_sampling(sz, args.repeats)
    rows = summary_rows(result)
    for r in rows:
        r.update(roofline_fraction(r["median_s"], r["flops"], r["bytes"], rates))
    print(
        f"exact workloads (d={sz['d']}, K={sz['k']}, batch {sz['batch']}, MLP "
        f"{sz['depth']}x{sz['width']}; ratio = peer time / time, > 1: faster than the peer)"
    )
    print(format_table(rows, _COLUMNS))
    if result["sampling"]:
        print(f"exact.prepare itself: {result['sampling']['prepare_s']:.3f} s")
    result["rows"] = rows
    save_results(result, args.out, "exact_workloads.json")
    return result


if __name__ == "__main__":
    main()
