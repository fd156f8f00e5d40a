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
(M * steps / run time), and, with ``fmjax._report.time_calls``, the median
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
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._common import (
    dense_layers,
    machine,
    save_results,
    training_flops_bytes,
)
from fmjax import data, losses, mixtures, models, schedules, sharding, train
from fmjax._report import format_table, time_calls


def _problems(key, m: int, k: int, d: int):
    """M independent couplings N(0, I) -> random K-component GMM, stacked along axis 0."""
    source = mixtures.standard_normal(d)
    targets = [mixtures.random_gaussian_mixture(kk, k, d) for kk in jax.random.split(key, m)]
    couplings = [mixtures.independent_coupling(source, t) for t in targets]
    return couplings, jax.tree.map(lambda *a: jnp.stack(a), *couplings)


_FULL = dict(models=256, steps=5000, batch=1024, width=128, depth=3)
_SMALL = dict(models=64, steps=300, batch=256, width=32, depth=2)


def _parse(argv) -> argparse.Namespace:
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
    return p.parse_args(argv)


class _Setup(NamedTuple):
    model: models.MLP
    couplings: list  # the M couplings, one by one (for the loop)
    instances: mixtures.JointGaussianMixture  # the same, stacked along axis 0 (for fit_many)
    params: dict  # M initial parameter pytrees, stacked
    keys: jax.Array  # (M,) training keys
    batch: int


def _setup(a, cfg: dict) -> _Setup:
    model = models.MLP(dim=a.dim, width=cfg["width"], depth=cfg["depth"])
    k_prob, k_init, k_train = jax.random.split(jax.random.key(a.seed), 3)
    couplings, instances = _problems(k_prob, cfg["models"], a.components, a.dim)
    params = jax.vmap(lambda k: models.init(model, key=k))(jax.random.split(k_init, cfg["models"]))
    keys = jax.random.split(k_train, cfg["models"])
    return _Setup(model, couplings, instances, params, keys, cfg["batch"])


def _loss_of_instance(setup: _Setup):
    """The CFM loss of one model with its coupling as an argument (vmapped by fit_many)."""

    def loss(p, k, coupling):
        return losses.cfm(setup.model.apply, coupling.sample, _SCHEDULE, setup.batch)(p, k)

    return loss


_SCHEDULE = schedules.linear()


def _run_fit_many(setup: _Setup, fit_kw: dict, mesh):
    """All M models in one compiled call; returns (FitResult, wall seconds)."""
    t0 = time.perf_counter()
    many = train.fit_many(
        _loss_of_instance(setup), setup.params, keys=setup.keys, instances=setup.instances,
        mesh=mesh, **fit_kw,
    )  # fmt: skip
    jax.block_until_ready(many.params)
    return many, time.perf_counter() - t0


def _run_loop(setup: _Setup, fit_kw: dict, n_loop: int):
    """``fit`` called from Python for the first ``n_loop`` models (one compilation each)."""
    results = []
    t0 = time.perf_counter()
    for i in range(n_loop):
        pairs = data.coupling_pairs(setup.couplings[i])
        loss_i = losses.cfm(setup.model.apply, pairs, _SCHEDULE, setup.batch)
        p_i = jax.tree.map(lambda x, i=i: x[i], setup.params)
        results.append(train.fit(loss_i, p_i, key=setup.keys[i], **fit_kw))
    jax.block_until_ready(results[-1].params)
    return results, time.perf_counter() - t0


def _max_rel_diffs(many, loop_res) -> list[float]:
    """Largest relative parameter difference between fit_many's model i and the loop's."""

    def rel(u, v, i):
        v = np.asarray(v)
        return float(np.max(np.abs(np.asarray(u)[i] - v)) / np.max(np.abs(v)))

    return [
        max(rel(u, v, i) for u, v in zip(jax.tree.leaves(many.params), jax.tree.leaves(r.params),
                                          strict=True))
        for i, r in enumerate(loop_res)
    ]  # fmt: skip


def _time_grad_steps(setup: _Setup) -> dict:
    """Median time of one compiled gradient step: one model vs the M vmapped models."""
    loss = _loss_of_instance(setup)
    grad_one, grad_many = jax.jit(jax.grad(loss)), jax.jit(jax.vmap(jax.grad(loss)))
    first = lambda tree: jax.tree.map(lambda x: x[0], tree)  # noqa: E731
    one = time_calls(grad_one, first(setup.params), setup.keys[0], first(setup.instances),
                     repeats=20)  # fmt: skip
    many = time_calls(grad_many, setup.params, setup.keys, setup.instances, repeats=10)
    return {
        name: {"compile_s": t.compile_s, "first_s": t.first_s, "median_s": t.median_s,
               "times_s": t.times_s}
        for name, t in (("one_model", one), ("vmapped_models", many))
    }  # fmt: skip


def _rows(m, steps, mesh, many, many_wall, loop_res, loop_wall, grad_step) -> list[dict]:
    n_loop = len(loop_res)
    loop_run = sum(steps / r.steps_per_second for r in loop_res)
    rows = [
        {
            "method": f"fit_many (1 call{', mesh' if mesh is not None else ''})",
            "models": m,
            "wall_s": many_wall,
            "compile_s": many.compile_time,
            "run_s": steps / many.steps_per_second,
            "model_steps_per_s": m * many.steps_per_second,  # steps_per_second counts calls
            "grad_step_ms": 1e3 * grad_step["vmapped_models"]["median_s"],
        },
        {
            "method": f"loop of fit ({n_loop} compiles)",
            "models": n_loop,
            "wall_s": loop_wall,
            "compile_s": sum(r.compile_time for r in loop_res),
            "run_s": loop_run,
            "model_steps_per_s": n_loop * steps / loop_run,
            # M sequential single-model steps
            "grad_step_ms": 1e3 * grad_step["one_model"]["median_s"] * m,
        },
    ]
    for r in rows:  # validation, eval_shape, optimizer init, state copies, host side
        r["other_s"] = r["wall_s"] - r["compile_s"] - r["run_s"]
    return rows


_COLUMNS = [
    ("method", "method", ""),
    ("models", "M", "d"),
    ("wall_s", "wall s (incl. compile)", ".2f"),
    ("compile_s", "compile s", ".2f"),
    ("run_s", "run s", ".2f"),
    ("other_s", "other s", ".2f"),
    ("model_steps_per_s", "model-steps/s", ".4g"),
    ("grad_step_ms", "M grad steps ms", ".3g"),
]


def main(argv=None) -> dict:
    a = _parse(argv)
    cfg = {k: getattr(a, k) if getattr(a, k) is not None else (_FULL if a.full else _SMALL)[k]
           for k in _SMALL}  # fmt: skip
    m, steps = cfg["models"], cfg["steps"]
    n_loop = m if a.loop_models is None else min(a.loop_models, m)
    setup = _setup(a, cfg)
    n_params = sum(x.size for x in jax.tree.leaves(setup.params)) // m
    fit_kw = dict(steps=steps, learning_rate=a.lr, progress=False)
    mesh = sharding.data_mesh() if a.mesh else None

    many, many_wall = _run_fit_many(setup, fit_kw, mesh)
    loop_res, loop_wall = _run_loop(setup, fit_kw, n_loop)
    diffs = _max_rel_diffs(many, loop_res)  # same training either way (vmap round-off only)
    grad_step = _time_grad_steps(setup)
    rows = _rows(m, steps, mesh, many, many_wall, loop_res, loop_wall, grad_step)

    speedup_wall = loop_wall * (m / n_loop) / many_wall  # the loop scaled to M models
    speedup_steady = rows[0]["model_steps_per_s"] / rows[1]["model_steps_per_s"]
    print(
        f"M={m} models, {steps} steps, batch {cfg['batch']}, MLP {cfg['depth']} x {cfg['width']} "
        f"({n_params} params), K={a.components}, d={a.dim}; {machine()['device']} x "
        f"{jax.device_count()}"
    )
    print(format_table(rows, _COLUMNS))
    print(
        f"fit_many vs loop: {speedup_wall:.1f}x less wall time (for M={m}), "
        f"{speedup_steady:.1f}x steady-state throughput; "
        f"max relative parameter difference {max(diffs):.2e}"
    )
    layers = dense_layers(jax.tree.map(lambda x: x[0], setup.params))
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
        "grad_step": grad_step,
        "final_loss_mean": {"fit_many": float(np.mean(many.losses[:, -20:])),
                            "loop": float(np.mean([r.losses[-20:] for r in loop_res]))},
    }  # fmt: skip
    save_results(payload, a.out, "many_models.json")
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
