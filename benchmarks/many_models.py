"""Many models at once: ``fit_many`` (vmap over problem instances, one compiled call) vs a loop.

M small velocity MLPs, each trained by CFM on its own problem: source N(0, I), target a random
K-component GMM in 2-D (a different GMM and a different seed per model). Two ways:

* ``fit_many``: the M problems are a batch of ``JointGaussianMixture`` instances (a pytree with a
  leading axis M) and the M models are trained by ``fmjax.train.fit_many`` in one compiled
  program (``vmap`` over models, one ``lax.fori_loop`` over steps): compiled once.
* loop: ``fmjax.train.fit`` called M times from Python, each with its own loss closure (its GMM),
  hence each compiled once: what a script looping over seeds or problems does.

Reported: total wall time (compilation included), compile time, run time (the compiled step
loop only, from ``FitResult.steps_per_second``), other time (argument checks, tracing the loss
for its output shape, optimizer init, host side), steady-state throughput in model-steps/s
(M * steps / run time), and, with ``time_compiled``, the median
time of one gradient step of the M vmapped models vs one model. Both paths give the same
parameters up to vmap round-off (checked and reported as ``max_rel_diff``).

CPU defaults are small (M = 64, 300 steps, batch 256, MLP 2 x 32): about two minutes on two
cores, most of it the loop's 64 compilations. ``--full`` runs M = 256, 5000 steps, batch 1024,
MLP 3 x 128 (GPU). ``--mesh`` splits the M models of ``fit_many`` across all devices (e.g. with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` or several GPUs).

In the combined table (``summary_rows``) the timed call is one training step of all M models,
its time the compiled step loop's run time divided by the steps (a mean over the loop, not a
median), and the loop of ``fit`` is the peer (its run time scaled to M models). Work per step:
M times ``_common.training_flops_bytes`` of one model's Dense layers at its batch (3 x the
forward matmuls; activations 3x, parameters 10x in bytes).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._common import (
    dense_layers,
    machine,
    print_table,
    time_compiled,
    training_flops_bytes,
    write_json,
)
from fmjax import data, losses, mixtures, models, schedules, sharding, train


def _problems(key, m: int, k: int, d: int):
    """M independent couplings N(0, I) -> random K-component GMM, stacked along axis 0."""
    source = mixtures.GaussianMixture(jnp.ones(1), jnp.zeros((1, d)), jnp.eye(d)[None])
    targets = [mixtures.random_gaussian_mixture(kk, k, d) for kk in jax.random.split(key, m)]
    couplings = [mixtures.independent_coupling(source, t) for t in targets]
    return couplings, jax.tree.map(lambda *a: jnp.stack(a), *couplings)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=int, default=None, help="M (CPU default 64)")
    p.add_argument("--steps", type=int, default=None, help="steps per model (CPU default 300)")
    p.add_argument("--batch", type=int, default=None, help="batch per model (CPU default 256)")
    p.add_argument("--width", type=int, default=None, help="MLP width (CPU default 32)")
    p.add_argument("--depth", type=int, default=None, help="MLP hidden layers (CPU default 2)")
    p.add_argument("--components", type=int, default=4, help="K of each target GMM")
    p.add_argument("--dim", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--loop-models",
        type=int,
        default=None,
        help="time the loop on the first this many models only (default: all M)",
    )
    p.add_argument("--full", action="store_true", help="M=256, 5000 steps, batch 1024, 3 x 128")
    p.add_argument("--mesh", action="store_true", help="split fit_many's models over all devices")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    a = p.parse_args(argv)  # fmt: skip
    full = dict(models=256, steps=5000, batch=1024, width=128, depth=3)
    small = dict(models=64, steps=300, batch=256, width=32, depth=2)
    cfg = {k: getattr(a, k) if getattr(a, k) is not None else (full if a.full else small)[k]
           for k in small}  # fmt: skip
    m, steps, batch = cfg["models"], cfg["steps"], cfg["batch"]
    n_loop = m if a.loop_models is None else min(a.loop_models, m)

    model = models.MLP(dim=a.dim, width=cfg["width"], depth=cfg["depth"])
    sched = schedules.linear()
    k_prob, k_init, k_train = jax.random.split(jax.random.key(a.seed), 3)
    couplings, instances = _problems(k_prob, m, a.components, a.dim)
    keys = jax.random.split(k_train, m)
    params = jax.vmap(lambda k: models.init(model, k))(jax.random.split(k_init, m))
    n_params = sum(x.size for x in jax.tree.leaves(params)) // m
    layers = dense_layers(jax.tree.map(lambda x: x[0], params))

    def loss_many(p, k, coupling):
        return losses.cfm(model.apply, coupling.sample, sched, batch)(p, k)

    kw = dict(steps=steps, learning_rate=a.lr, progress=False)
    mesh = sharding.data_mesh() if a.mesh else None

    # --- fit_many: all M in one compiled call
    t0 = time.perf_counter()
    many = train.fit_many(loss_many, params, keys, instances=instances, mesh=mesh, **kw)
    jax.block_until_ready(many.params)
    many_wall = time.perf_counter() - t0

    # --- Python loop over fit, one compilation per model (its own closure)
    loop_res = []
    t0 = time.perf_counter()
    for i in range(n_loop):
        loss_i = losses.cfm(model.apply, data.coupling_pairs(couplings[i]), sched, batch)
        p_i = jax.tree.map(lambda x, i=i: x[i], params)
        loop_res.append(train.fit(loss_i, p_i, keys[i], **kw))
    jax.block_until_ready(loop_res[-1].params)
    loop_wall = time.perf_counter() - t0
    loop_compile = sum(r.compile_time for r in loop_res)
    loop_run = sum(steps / r.steps_per_second for r in loop_res)

    # Same training either way (vmap round-off only).
    diffs = [
        max(
            float(np.max(np.abs(np.asarray(u)[i] - np.asarray(v))) / np.max(np.abs(np.asarray(v))))
            for u, v in zip(jax.tree.leaves(many.params), jax.tree.leaves(r.params), strict=True)
        )
        for i, r in enumerate(loop_res)
    ]

    # --- one gradient step, compiled, median: M vmapped models vs one model
    grad_one = jax.jit(jax.grad(loss_many))
    grad_many = jax.jit(jax.vmap(jax.grad(loss_many)))
    p0 = jax.tree.map(lambda x: x[0], params)
    c0 = jax.tree.map(lambda x: x[0], instances)
    t_one = time_compiled(grad_one, p0, keys[0], c0, repeats=20)
    t_many = time_compiled(grad_many, params, keys, instances, repeats=10)

    # Loop totals scaled to M models when only n_loop were timed.
    scale = m / n_loop
    rows = [
        {
            "method": f"fit_many (1 call{', mesh' if mesh is not None else ''})",
            "models": m,
            "wall_s": many_wall,
            "compile_s": many.compile_time,
            "run_s": steps / many.steps_per_second,
            "model_steps_per_s": m * many.steps_per_second,  # steps_per_second counts calls
            "grad_step_ms": 1e3 * t_many["median_s"],
        },
        {
            "method": f"loop of fit ({n_loop} compiles)",
            "models": n_loop,
            "wall_s": loop_wall,
            "compile_s": loop_compile,
            "run_s": loop_run,
            "model_steps_per_s": n_loop * steps / loop_run,
            "grad_step_ms": 1e3 * t_one["median_s"] * m,  # M sequential single-model steps
        },
    ]
    for r in rows:  # validation, eval_shape, optimizer init, state copies, host side
        r["other_s"] = r["wall_s"] - r["compile_s"] - r["run_s"]
    speedup_wall = loop_wall * scale / many_wall
    speedup_steady = rows[0]["model_steps_per_s"] / rows[1]["model_steps_per_s"]
    print(
        f"M={m} models, {steps} steps, batch {batch}, MLP {cfg['depth']} x {cfg['width']} "
        f"({n_params} params), K={a.components}, d={a.dim}; {machine()['device']} x "
        f"{jax.device_count()}"
    )
    print_table(
        rows,
        [
            ("method", "method", ""),
            ("models", "M", "d"),
            ("wall_s", "wall s (incl. compile)", ".2f"),
            ("compile_s", "compile s", ".2f"),
            ("run_s", "run s", ".2f"),
            ("other_s", "other s", ".2f"),
            ("model_steps_per_s", "model-steps/s", ".4g"),
            ("grad_step_ms", "M grad steps ms", ".3g"),
        ],
    )
    print(
        f"fit_many vs loop: {speedup_wall:.1f}x less wall time (for M={m}), "
        f"{speedup_steady:.1f}x steady-state throughput; "
        f"max relative parameter difference {max(diffs):.2e}"
    )
    payload = {
        "benchmark": "many_models",
        "machine": machine(),
        "config": {**cfg, "components": a.components, "dim": a.dim, "lr": a.lr,
                   "seed": a.seed, "mesh": a.mesh, "loop_models": n_loop, "n_params": n_params,
                   "dense_layers": layers},
        "rows": rows,
        "speedup_wall": speedup_wall,
        "speedup_steady_state": speedup_steady,
        "max_rel_diff": max(diffs),
        "grad_step": {"one_model": t_one, "vmapped_models": t_many},
        "final_loss_mean": {"fit_many": float(np.mean(many.losses[:, -20:])),
                            "loop": float(np.mean([r.losses[-20:] for r in loop_res]))},
    }  # fmt: skip
    write_json(payload, a.out, "many_models.json")
    return payload


def summary_rows(result: dict) -> list[dict]:
    """One row: a training step of all M models by fit_many, the loop of fit as the peer."""
    cfg = result["config"]
    many, loop = result["rows"]
    m, steps = many["models"], cfg["steps"]
    flops, nbytes = training_flops_bytes([tuple(x) for x in cfg["dense_layers"]], cfg["batch"])
    ours = many["run_s"] / steps
    peer = loop["run_s"] / steps * m / loop["models"]  # the loop's run time for M models
    return [
        {
            "benchmark": "many_models",
            "workload": f"fit_many M={m} MLP {cfg['depth']}x{cfg['width']} batch {cfg['batch']}",
            "precision": "default",
            "median_s": ours,
            "compile_s": many["compile_s"],
            "throughput": many["model_steps_per_s"],
            "unit": "model-steps/s",
            "flops": m * flops,
            "bytes": m * nbytes,
            "peer": "loop of fit",
            "peer_detail": f"Python loop of fmjax.train.fit ({loop['models']} models, one "
            f"compilation each, {loop['compile_s']:.1f} s compiling), scaled to M={m}",
            "peer_median_s": peer,
            "peer_throughput": m / peer,
            "ratio": peer / ours,
        }
    ]


if __name__ == "__main__":
    main()
