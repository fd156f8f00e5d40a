"""Sampling and likelihood throughput: fmjax vs Meta's ``flow_matching`` (torch), same weights.

Workloads
  1. ODE sampling with the 2-D checkerboard MLP of Meta's example (input [x, t], 4 hidden layers of
     512, swish), midpoint, step 0.05 (20 steps, 40 NFE): samples/s, fmjax vs ``ODESolver.sample``.
  2. Log-likelihood of a regular grid on [-4, 4]^2 with the exact divergence, midpoint step 0.05:
     points/s, fmjax ``likelihood.log_likelihood`` vs ``ODESolver.compute_likelihood``.
  3. Exact-velocity ODE sampling of a GMM path, (d, K) = (64, 64), midpoint 20 steps: samples/s.

Both libraries get the same random weights (torch-style uniform init, copied into flax), so their
samples and log-likelihoods agree up to float32 round-off; the max abs differences are reported.
Matmuls run in float32 at HIGHEST precision in JAX (no TF32/bf16 passes on GPUs); torch with TF32
disabled. Timings: median of ``--repeats`` runs after a warm-up call (the first call, compile
included, is reported apart), with ``block_until_ready`` / synchronous torch.

The peer is optional: run in a venv with torch and flow_matching (see README), with PYTHONPATH set
to the repository; without them it prints "peer unavailable".

    python -m benchmarks.sampling             # small CPU sizes (~2 min)
    python -m benchmarks.sampling --full      # 1e6 samples, 200 x 200 grid, 1e6 GMM samples

Work per timed call (n points, NFE velocity evaluations; MLP layer sizes [3, 512 x 4, 2], see
``_common.dense_flops_bytes``): MLP forward on n points = 2 n sum(fan_in fan_out) flops and
4 (n sum(fan_in + fan_out) + P) bytes (each layer reads its input and writes its output once);
sampling = NFE forwards; likelihood with the exact divergence = NFE (1 + d) forwards (one primal
and d tangents of ``jax.jvp``); exact GMM sampling = NFE exact-velocity calls, 4 n K d^2 flops
and 4 (2 n d + K (1 + 2d + 4 d^2)) bytes each (benchmarks/exact_velocity.py). The peer runs on
the GPU when torch sees one (TF32 off), else on the CPU.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np

import fmjax
from benchmarks._common import (
    dense_flops_bytes,
    mlp_layers,
    save_results,
)
from benchmarks.exact_velocity import work as velocity_work
from fmjax import likelihood, models, sample, schedules
from fmjax._report import format_table, time_calls

try:
    import torch
    from flow_matching.solver import ODESolver

    PEER_ERROR = None
except Exception as e:  # noqa: BLE001 - any import failure means "no peer"
    torch = ODESolver = None
    PEER_ERROR = f"{type(e).__name__}: {e}"

HIDDEN, LAYERS, DIM = 512, 4, 2
STEP = 0.05
STEPS = round(1 / STEP)  # 20 midpoint steps = 40 NFE
SIZES = [DIM + 1] + [HIDDEN] * LAYERS + [DIM]


def _torch_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _torch_sync(out):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out


def checkerboard_mlp() -> models.MLP:
    """Meta's 2-D example MLP: [x, t] -> 4 x (Dense(512), swish) -> Dense(2), full float32."""
    return models.MLP(DIM, width=HIDDEN, depth=LAYERS, time_embedding="raw", precision="highest")


def random_weights(seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """torch.nn.Linear-style init U(-1/sqrt(fan_in), 1/sqrt(fan_in)): (kernel (in, out), bias)."""
    rng = np.random.default_rng(seed)
    sizes = [DIM + 1] + [HIDDEN] * LAYERS + [DIM]
    out = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
        bound = 1 / math.sqrt(fan_in)
        w = rng.uniform(-bound, bound, (fan_in, fan_out)).astype(np.float32)
        b = rng.uniform(-bound, bound, (fan_out,)).astype(np.float32)
        out.append((w, b))
    return out


def flax_params(weights):
    names = [f"hidden_{i}" for i in range(LAYERS)] + ["out"]
    return {
        "params": {
            name: {"kernel": jnp.asarray(w), "bias": jnp.asarray(b)}
            for name, (w, b) in zip(names, weights, strict=True)
        }
    }


def torch_model(weights):
    class MLP(torch.nn.Module):
        """Meta's example MLP (flow_matching/examples/2d_flow_matching.ipynb)."""

        def __init__(self):
            super().__init__()
            layers = []
            for i, (w, _) in enumerate(weights):
                layers.append(torch.nn.Linear(*w.shape))
                if i < len(weights) - 1:
                    layers.append(torch.nn.SiLU())  # swish
            self.main = torch.nn.Sequential(*layers)

        def forward(self, x, t):
            t = t.reshape(-1, 1).float().expand(x.shape[0], 1)
            return self.main(torch.cat([x, t], dim=1))

    model = MLP().to(_torch_device())
    linears = [m for m in model.main if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for lin, (w, b) in zip(linears, weights, strict=True):
            lin.weight.copy_(torch.from_numpy(w.T.copy()).to(lin.weight.device))
            lin.bias.copy_(torch.from_numpy(b).to(lin.bias.device))
    return model.eval()


def _peer_sampling(weights, x0, repeats):
    """Meta's ``ODESolver.sample`` from the same x0, timed: (``time_calls``' result, NFE)."""
    vf = torch_model(weights)
    calls = [0]

    def velocity(x, t):
        calls[0] += 1
        return vf(x, t)

    solver = ODESolver(velocity_model=velocity)
    x0_t = torch.from_numpy(x0).to(_torch_device())
    with torch.no_grad():
        tp = time_calls(
            lambda: solver.sample(x_init=x0_t, step_size=STEP, method="midpoint"),
            repeats=repeats,
            sync=_torch_sync,
        )
    return tp, calls[0] // (repeats + 2)  # NFE per call: first + warm-up + timed calls


def bench_mlp_sampling(n, weights, repeats, peer, seed):
    model = checkerboard_mlp()
    params = flax_params(weights)
    x0 = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)

    @jax.jit
    def run(p, x):
        sol = sample.ode(functools.partial(model.apply, p), x, solver="midpoint", steps=STEPS)
        return sol.x, sol.nfe

    x0_j = jnp.asarray(x0)
    t = time_calls(run, params, x0_j, repeats=repeats)
    first, med, (xs, nfe) = t.first_s, t.median_s, t.out
    flops, nbytes = dense_flops_bytes(mlp_layers(SIZES), n)
    row = {
        "workload": "mlp_midpoint_sampling",
        "n": n,
        "nfe": int(nfe),
        "fmjax_first_s": first,
        "fmjax_s": med,
        "fmjax_per_s": n / med,
        "flops": int(nfe) * flops,
        "bytes": int(nfe) * nbytes,
    }
    if peer:
        tp, peer_nfe = _peer_sampling(weights, x0, repeats)
        tfirst, tmed, xt = tp.first_s, tp.median_s, tp.out
        row.update(
            peer_s=tmed,
            peer_first_s=tfirst,
            peer_per_s=n / tmed,
            peer_nfe=peer_nfe,
            max_abs_diff=float(np.max(np.abs(np.asarray(xs) - xt.cpu().numpy()))),
        )
    return row


def _grid_points(grid: int) -> np.ndarray:
    """The grid x grid points of [-4, 4]^2, shape (grid^2, 2)."""
    g = np.linspace(-4, 4, grid, dtype=np.float32)
    return np.stack(np.meshgrid(g, g, indexing="ij"), axis=-1).reshape(-1, DIM)


def _fmjax_likelihood(weights, pts, repeats):
    """fmjax exact-divergence log-likelihood of ``pts``, timed; ``time_calls``' result."""
    model = checkerboard_mlp()
    params = flax_params(weights)

    @jax.jit
    def run(p, x):
        out = likelihood.log_likelihood(
            functools.partial(model.apply, p), x, method="exact", solver="midpoint", steps=STEPS
        )
        return out.log_prob, out.nfe

    return time_calls(run, params, jnp.asarray(pts), repeats=repeats)


def _peer_likelihood(weights, pts, repeats):
    """Meta's ``ODESolver.compute_likelihood`` (exact divergence), timed; ``time_calls``' result."""
    vf = torch_model(weights)
    solver = ODESolver(velocity_model=lambda x, t: vf(x, t))

    def log_p0(x):
        return -0.5 * (x * x).sum(-1) - 0.5 * DIM * math.log(2 * math.pi)

    x1 = torch.from_numpy(pts).to(_torch_device())
    return time_calls(
        lambda: solver.compute_likelihood(
            x_1=x1, log_p0=log_p0, step_size=STEP, method="midpoint", exact_divergence=True
        ),
        repeats=repeats,
        sync=_torch_sync,
    )


def bench_mlp_likelihood(grid, weights, repeats, peer):
    pts = _grid_points(grid)
    n = pts.shape[0]
    t = _fmjax_likelihood(weights, pts, repeats)
    first, med, (lp, nfe) = t.first_s, t.median_s, t.out
    flops, nbytes = dense_flops_bytes(mlp_layers(SIZES), n)
    row = {
        "workload": "mlp_grid_log_likelihood_exact_div",
        "n": n,
        "grid": grid,
        "nfe": int(nfe),
        "fmjax_first_s": first,
        "fmjax_s": med,
        "fmjax_per_s": n / med,
        "flops": int(nfe) * (1 + DIM) * flops,
        "bytes": int(nfe) * (1 + DIM) * nbytes,
    }
    if peer:
        tp = _peer_likelihood(weights, pts, repeats)
        tfirst, tmed, (_, tlp) = tp.first_s, tp.median_s, tp.out
        row.update(
            peer_s=tmed,
            peer_first_s=tfirst,
            peer_per_s=n / tmed,
            max_abs_diff=float(np.max(np.abs(np.asarray(lp) - tlp.detach().cpu().numpy()))),
        )
    return row


def bench_gmm_sampling(n, d, k, repeats, seed):
    key = jax.random.key(seed)
    p0 = fmjax.mixtures.standard_normal(d)
    p1 = fmjax.random_gaussian_mixture(key, k, d)
    c = fmjax.independent_coupling(p0, p1)
    v = functools.partial(fmjax.exact.velocity, c, schedules.linear())

    @jax.jit
    def run(x):
        sol = sample.ode(v, x, solver="midpoint", steps=STEPS)
        return sol.x, sol.nfe

    x0 = sample.draw_source(jax.random.key(seed + 1), n, d)
    t = time_calls(run, x0, repeats=repeats)
    first, med, (_, nfe) = t.first_s, t.median_s, t.out
    flops, nbytes = velocity_work(d, k, n)
    return {
        "workload": f"exact_gmm_midpoint_sampling_d{d}_K{k}",
        "n": n,
        "nfe": int(nfe),
        "fmjax_first_s": first,
        "fmjax_s": med,
        "fmjax_per_s": n / med,
        "flops": int(nfe) * flops,
        "bytes": int(nfe) * nbytes,
    }


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n-samples", type=int, default=10_000, help="MLP samples (full: 1e6)")
    ap.add_argument("--grid", type=int, default=40, help="likelihood grid side (full: 200)")
    ap.add_argument("--gmm-samples", type=int, default=2_000, help="GMM samples (full: 1e6)")
    ap.add_argument("--gmm-dim", type=int, default=64)
    ap.add_argument("--gmm-components", type=int, default=64)
    ap.add_argument("--full", action="store_true", help="full sizes: 1e6 samples, 200x200 grid")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs after warm-up")
    ap.add_argument("--no-peer", action="store_true", help="skip Meta's flow_matching")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/sampling.json")
    return ap


def _setup_peer(no_peer: bool) -> bool:
    """Whether the peer runs; says why not when it was asked for, and turns TF32 off for it."""
    peer = not no_peer and PEER_ERROR is None
    if not no_peer and not peer:
        print(f"peer unavailable ({PEER_ERROR})")
    if peer:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return peer


def _env(peer: bool) -> dict:
    return {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(dv) for dv in jax.devices()],
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "matmul_precision": "float32, jax precision=HIGHEST; torch float32, TF32 off",
        "torch": torch.__version__ if peer else None,
        "torch_threads": torch.get_num_threads() if peer else None,
        "torch_device": _torch_device() if peer else None,
    }


def _run_workloads(args, peer: bool) -> list[dict]:
    """The three workloads, with fmjax's speedup over the peer where it ran."""
    weights = random_weights(args.seed)
    rows = [
        bench_mlp_sampling(args.n_samples, weights, args.repeats, peer, args.seed),
        bench_mlp_likelihood(args.grid, weights, args.repeats, peer),
        bench_gmm_sampling(
            args.gmm_samples, args.gmm_dim, args.gmm_components, args.repeats, args.seed
        ),
    ]
    for r in rows:
        if "peer_per_s" in r:
            r["speedup"] = r["fmjax_per_s"] / r["peer_per_s"]
    return rows


def _print_table(env: dict, rows: list[dict]) -> None:
    print(f"backend {env['backend']}, {env['cpu_count']} CPUs, {env['matmul_precision']}")
    print(
        format_table(
            rows,
            [
                ("workload", "workload", ""),
                ("n", "n", "d"),
                ("nfe", "nfe", "d"),
                ("fmjax_per_s", "fmjax/s", ".4g"),
                ("peer_per_s", "peer/s", ".4g"),
                ("speedup", "speedup", ".2f"),
                ("fmjax_first_s", "1st call s", ".2f"),
                ("max_abs_diff", "max|diff|", ".2e"),
            ],
        )
    )


def main(argv=None):
    args = _parser().parse_args(argv)
    if args.full:
        args.n_samples, args.grid, args.gmm_samples = 1_000_000, 200, 1_000_000
    peer = _setup_peer(args.no_peer)
    env = _env(peer)
    rows = _run_workloads(args, peer)
    _print_table(env, rows)
    result = {"env": env, "args": vars(args), "results": rows}
    save_results(result, args.out, "sampling.json")
    return result


_SHORT = {
    "mlp_midpoint_sampling": "MLP 4x512 ODE sampling",
    "mlp_grid_log_likelihood_exact_div": "MLP 4x512 log-likelihood, exact div",
}


def summary_rows(result: dict) -> list[dict]:
    """One row per workload (precision highest); see benchmarks/__main__.py."""
    env, out = result["env"], []
    for r in result["results"]:
        name = _SHORT.get(r["workload"], r["workload"].replace("_", " "))
        row = {
            "benchmark": "sampling",
            "workload": f"{name} n={r['n']} nfe={r['nfe']}",
            "precision": "highest",
            "median_s": r["fmjax_s"],
            "compile_s": max(0.0, r["fmjax_first_s"] - r["fmjax_s"]),
            "throughput": r["fmjax_per_s"],
            "unit": "samples/s" if "sampling" in r["workload"] else "points/s",
            "flops": r["flops"],
            "bytes": r["bytes"],
        }
        if "peer_s" in r:
            row.update(
                peer="flow_matching",
                peer_detail=f"flow_matching (torch {env['torch']}, {env['torch_device']}, "
                f"{env['torch_threads']} threads, tf32 off)",
                peer_median_s=r["peer_s"],
                peer_throughput=r["peer_per_s"],
                ratio=r["peer_s"] / r["fmjax_s"],
            )
        out.append(row)
    return out


if __name__ == "__main__":
    main()
