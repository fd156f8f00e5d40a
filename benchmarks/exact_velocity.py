"""Throughput of the exact GMM velocity: points/s, fraction of the matmul roofline, PyTorch peer.

    python -m benchmarks.exact_velocity                 # issue sizes, N scaled down on CPU
    python -m benchmarks.exact_velocity --scale 1       # full N everywhere
    python -m benchmarks.exact_velocity --configs 2,8,1000000

Work is counted as 4 N K d^2 flops (two d x d matrix-vector products per point and component).
Accuracy: relative error of float32 (precision "highest", no TF32) against float64 on a subset.
The PyTorch peer (batched Cholesky + triangular solve + logsumexp, same formulas) runs in the
same process when ``torch`` is importable.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import fmjax
from benchmarks._common import (
    machine,
    matmul_rate,
    print_table,
    time_calls,
    time_compiled,
    write_json,
)

CONFIGS = [(2, 8, 1_000_000), (16, 16, 100_000), (64, 64, 1_000_000)]


def _problem(d: int, k: int, n: int, t: float, dtype):
    """A random joint GMM and N points drawn from its p_t, where a sampler evaluates the field."""
    c = fmjax.random_joint_mixture(jax.random.key(d * 1000 + k), k, d, mean_scale=2.0, dtype=dtype)
    x = fmjax.exact.marginal(c, fmjax.schedules.linear(), t).sample(jax.random.key(1), n)
    return c, x


def _torch_velocity(torch, w, means, covs, t, x):
    """Batched PyTorch version of the same closed form (linear schedule), for the peer timing."""
    d = x.shape[1]
    a, b, da, db = t, 1 - t, 1.0, -1.0
    m0, m1 = means[:, :d], means[:, d:]
    s00, s01, s10, s11 = covs[:, :d, :d], covs[:, :d, d:], covs[:, d:, :d], covs[:, d:, d:]
    mu = b * m0 + a * m1
    dmu = db * m0 + da * m1
    cov = b * b * s00 + a * b * (s01 + s10) + a * a * s11
    cross = b * db * s00 + a * db * s01 + b * da * s10 + a * da * s11
    chol = torch.linalg.cholesky(cov)  # (K, d, d)
    diff = (x[None] - mu[:, None]).transpose(1, 2)  # (K, d, N)
    z = torch.linalg.solve_triangular(chol, diff, upper=False)  # (K, d, N)
    m = torch.linalg.solve_triangular(chol, cross.transpose(1, 2), upper=False).transpose(1, 2)
    v = dmu[:, :, None] + m @ z  # (K, d, N)
    logdet = torch.log(torch.diagonal(chol, dim1=1, dim2=2)).sum(1)
    logp = torch.log(w)[:, None] - 0.5 * (z * z).sum(1) - logdet[:, None]  # (K, N)
    alpha = torch.softmax(logp, dim=0)
    return (alpha[:, None, :] * v).sum(0).T


def _time_torch(c, x, t, repeats):
    try:
        import torch
    except ImportError:
        return None
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False
    args = [torch.as_tensor(np.asarray(a), device=dev) for a in (c.weights, c.means, c.covs, x)]

    def sync(out):
        if dev == "cuda":
            torch.cuda.synchronize()
        return out

    with torch.no_grad():
        res = time_calls(lambda: _torch_velocity(torch, *args[:3], t, args[3]), repeats, sync)
    return res.median_s, np.asarray(res.out.cpu())


def run(configs, scale: float, repeats: int, peer: bool, precision: str) -> dict:
    sched = fmjax.schedules.linear()
    t = 0.5
    rate = matmul_rate()
    rows = []
    for d, k, n_full in configs:
        n = max(1, int(n_full * scale))
        c, x = _problem(d, k, n, t, jnp.float32)
        field = jax.jit(lambda c, t, x: fmjax.exact.velocity(c, sched, t, x, precision=precision))
        res = time_compiled(field, c, jnp.float32(t), x, repeats=repeats)
        flops = 4.0 * n * k * d * d
        # Accuracy on a subset against the float64 engine (itself checked against NumPy to 1e-10).
        m = min(n, 2000)
        v32 = np.asarray(field(c, jnp.float32(t), x[:m]), np.float64)
        with jax.enable_x64(True):
            c64 = jax.tree.map(lambda a: jnp.asarray(np.asarray(a), jnp.float64), c)
            v64 = np.asarray(
                fmjax.exact.velocity(c64, sched, t, jnp.asarray(np.asarray(x[:m]), jnp.float64))
            )
        rel = float(np.max(np.abs(v32 - v64)) / np.max(np.abs(v64)))
        row = {
            "d": d,
            "K": k,
            "N": n,
            "compile_s": res["compile_s"],
            "median_s": res["median_s"],
            "points_per_s": n / res["median_s"],
            "gflops": flops / res["median_s"] / 1e9,
            "roofline_frac": flops / res["median_s"] / rate,
            "rel_err_vs_f64": rel,
        }
        if peer:
            got = _time_torch(c, x, t, repeats)
            if got is not None:
                t_peer, v_peer = got
                row["torch_median_s"] = t_peer
                row["torch_points_per_s"] = n / t_peer
                row["speedup_vs_torch"] = t_peer / res["median_s"]
                row["torch_max_abs_diff"] = float(np.max(np.abs(v_peer[:m] - v32)))
        rows.append(row)
        print(f"  done d={d} K={k} N={n}: {row['points_per_s']:.3g} points/s", flush=True)
    return {"machine": machine(), "matmul_flops": rate, "precision": precision, "rows": rows}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--configs", nargs="*", help="d,K,N triples (default: the issue's three)")
    p.add_argument(
        "--scale",
        type=float,
        default=None,
        help="multiply N by this (default 1 on GPU, 0.05 on CPU)",
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--precision", default="highest", choices=["highest", "high", "default"])
    p.add_argument("--no-peer", action="store_true", help="skip the PyTorch peer")
    p.add_argument("--out", default=None, help="JSON path")
    args = p.parse_args(argv)
    configs = (
        [tuple(int(v) for v in s.split(",")) for s in args.configs] if args.configs else CONFIGS
    )
    scale = (
        args.scale if args.scale is not None else (1.0 if jax.default_backend() != "cpu" else 0.05)
    )
    result = run(configs, scale, args.repeats, not args.no_peer, args.precision)
    mach = result["machine"]
    print(
        f"\nexact velocity, {mach['backend']} ({mach['device']}), precision={args.precision}, "
        f"measured matmul rate {result['matmul_flops'] / 1e9:.1f} GFLOP/s"
    )
    print_table(
        result["rows"],
        [
            ("d", "d", ""),
            ("K", "K", ""),
            ("N", "N", ""),
            ("compile_s", "compile s", ".2f"),
            ("median_s", "median s", ".4g"),
            ("points_per_s", "points/s", ".3g"),
            ("roofline_frac", "of matmul", ".1%"),
            ("rel_err_vs_f64", "rel err", ".1e"),
            ("torch_points_per_s", "torch pts/s", ".3g"),
            ("speedup_vs_torch", "x torch", ".2f"),
        ],
    )
    write_json(result, args.out, f"exact_velocity_{mach['backend']}.json")
    return result


if __name__ == "__main__":
    main()
