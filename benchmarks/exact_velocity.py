"""Exact GMM velocity: time, points/s, roofline fraction, error vs float64, memory, PyTorch peer.

    python -m benchmarks.exact_velocity                 # issue sizes, N scaled down on CPU
    python -m benchmarks.exact_velocity --scale 1       # full N everywhere
    python -m benchmarks.exact_velocity --configs 2,8,1000000 --modes highest default bf16
    python -m benchmarks.exact_velocity --memory-only 1024,256,100000   # compile only, no run
    python -m benchmarks.exact_velocity --full          # N x 1, all modes, + (1024, 256, 1e5)
    python -m benchmarks.exact_velocity --coupling independent --scale 1 \
        --configs 2,8,20000 16,16,4000 64,16,500       # time-free path, + one t per point

Work per timed call (``fmjax.exact.velocity`` at one t on N points, K components, dimension d):
  flops = 4 N K d^2: z = W (x - mu) and v = M z, two d x d matrix-vector products per point and
      component (the O(K d^3) Cholesky factors and the O(N K d) elementwise terms not counted);
  bytes = 4 (2 N d + K (1 + 2d + 4 d^2)): read x, write u, read the float32 parameters (weights,
      means (K, 2d), covariances (K, 2d, 2d)) once.
The roofline time is max(flops / matmul rate of the same precision mode, bytes / copy bandwidth),
both measured on this machine in the same run (benchmarks/_common.py).

Precision modes (``--modes``, default "highest"; ``--full`` runs all three): "highest" (full
float32), "default" (TF32 on NVIDIA GPUs; plain float32 on a CPU) and "bf16"
(``jax.lax.DotAlgorithmPreset.BF16_BF16_F32``: bf16 inputs, float32 accumulation), passed as
``precision=`` to ``fmjax.exact.velocity``. Each is timed and its error is measured against the
float64 engine (itself checked against NumPy to 1e-10): max |u - u64| / max |u64| on at most
2000 points. A mode the backend cannot compile is printed as "unsupported".

Couplings (``--coupling``): "joint" (default; random cross-covariances, the per-time Cholesky
path) or "independent" (the same mixture with S01 = S10 = 0, passed as
``fmjax.exact.prepare(c)``, the time-free path; the one-off ``prepare`` time is reported apart).
Per-point times (``--per-point``, on by default for independent couplings): the same call with
one t per point (t of shape (N,), uniform on [0, 1]), timed next to the shared t; for joint
couplings this is the vmapped per-point factorisation, K d^3 work per point.

Memory: the temp bytes of the compiled executable (XLA's memory analysis) next to the naive
(N, K, d) float32 intermediate, 4 N K d bytes, that a direct batched version allocates.
``--memory-only d,K,N`` builds the problem from ``jax.ShapeDtypeStruct`` leaves and lowers and
compiles ``fmjax.exact.velocity`` without allocating anything: argument, output and temp bytes.
With ``--full`` the (1024, 256, 1e5) case is compiled only on a CPU (its covariances alone take
4.3 GB) and run on an accelerator.

The PyTorch peer (batched Cholesky + triangular solves + softmax, same formulas, TF32 off) runs
in the same process when ``torch`` is importable, on points in chunks so that each (K, d, chunk)
intermediate stays under 2^26 elements; it is compared with the "highest" mode and skipped for
the memory configs.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import fmjax
from benchmarks._common import (
    add_bf16_rate,
    machine,
    machine_rates,
    on_cpu,
    rates_line,
    roofline_fraction,
    save_results,
)
from fmjax._report import format_table, time_calls

CONFIGS = [(2, 8, 1_000_000), (16, 16, 100_000), (64, 64, 1_000_000)]
MEMORY_CONFIGS = [(1024, 256, 100_000)]
MODES = ("highest", "default", "bf16")
PRECISIONS = {
    "highest": "highest",
    "default": "default",
    "bf16": jax.lax.DotAlgorithmPreset.BF16_BF16_F32,
}
T = 0.5
ACCURACY_POINTS = 2000
PEER_CHUNK_ELEMENTS = 1 << 26
SCHED = fmjax.schedules.linear()


def work(d: int, k: int, n: int) -> tuple[float, float]:
    """(flops, bytes) of one velocity call; see the module docstring."""
    return 4.0 * n * k * d * d, 4.0 * (2 * n * d + k * (1 + 2 * d + 4 * d * d))


def _independent(c):
    """The same mixture with its cross-covariances S01 = S10 set to zero."""
    m0, m1, s00, s01, s10, s11 = c.blocks()
    z = jnp.zeros_like(s01)
    covs = jnp.concatenate([jnp.concatenate([s00, z], -1), jnp.concatenate([z, s11], -1)], -2)
    return fmjax.JointGaussianMixture._from_leaves(c.weights, c.means, covs)


def _problem(d: int, k: int, n: int, t: float, dtype, independent: bool = False):
    """A random joint GMM and N points drawn from its p_t, built on the device (jitted)."""

    @jax.jit
    def make(key_c, key_x):
        c = fmjax.random_joint_mixture(key_c, k, d, mean_scale=2.0, dtype=dtype)
        if independent:
            c = _independent(c)
        return c, fmjax.exact.marginal(c, SCHED, t).sample(key_x, n)

    return make(jax.random.key(d * 1000 + k), jax.random.key(1))


def _abstract_problem(d: int, k: int, n: int, dtype=jnp.float32):
    """The same problem as ShapeDtypeStructs: nothing is allocated."""
    s = jax.ShapeDtypeStruct
    c = fmjax.JointGaussianMixture._from_leaves(
        s((k,), dtype), s((k, 2 * d), dtype), s((k, 2 * d, 2 * d), dtype)
    )
    return c, s((n, d), dtype)


def _field(mode: str):
    precision = PRECISIONS[mode]
    return jax.jit(lambda c, t, x: fmjax.exact.velocity(c, SCHED, t, x, precision=precision))


def _memory(compiled, d: int, k: int, n: int) -> dict:
    out = {"naive_bytes": 4 * n * k * d}
    try:
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not implemented by every backend
        stats = None
    for name in ("argument", "output", "temp"):
        out[f"{name}_bytes"] = getattr(stats, f"{name}_size_in_bytes", None)
    return out


def _compile(mode: str, c, t, x) -> tuple:
    """Trace, lower and compile; returns (compiled, compile seconds)."""
    t0 = time.perf_counter()
    compiled = _field(mode).lower(c, t, x).compile()
    return compiled, time.perf_counter() - t0


def memory_only(d: int, k: int, n: int, mode: str = "highest") -> dict:
    """Lower and compile abstractly (no allocation): compile time and XLA's memory analysis."""
    c, x = _abstract_problem(d, k, n)
    compiled, compile_s = _compile(mode, c, jax.ShapeDtypeStruct((), jnp.float32), x)
    return {"d": d, "K": k, "N": n, "mode": mode, "compile_s": compile_s,
            **_memory(compiled, d, k, n)}  # fmt: skip


def _reference(c, x, m: int) -> np.ndarray:
    """float64 velocity at the first m points."""
    with jax.enable_x64(True):
        c64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), c)
        x64 = jnp.asarray(x[:m], jnp.float64)
        return np.asarray(fmjax.exact.velocity(c64, SCHED, T, x64))


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
    m = torch.linalg.solve_triangular(chol, cross.transpose(1, 2), upper=False).transpose(1, 2)
    logdet = torch.log(torch.diagonal(chol, dim1=1, dim2=2)).sum(1)
    log_w = torch.log(w)[:, None] - logdet[:, None]
    k = w.shape[0]
    chunk = max(1, PEER_CHUNK_ELEMENTS // (k * d))
    out = []
    for xc in torch.split(x, chunk):
        diff = (xc[None] - mu[:, None]).transpose(1, 2)  # (K, d, n)
        z = torch.linalg.solve_triangular(chol, diff, upper=False)  # (K, d, n)
        v = dmu[:, :, None] + m @ z  # (K, d, n)
        alpha = torch.softmax(log_w - 0.5 * (z * z).sum(1), dim=0)  # (K, n)
        out.append((alpha[:, None, :] * v).sum(0).T)
    return torch.cat(out)


def _time_torch(c, x, t, repeats):
    try:
        import torch
    except ImportError:
        return None
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False
    args = [torch.as_tensor(np.array(a), device=dev) for a in (c.weights, c.means, c.covs, x)]

    def sync(out):
        if dev == "cuda":
            torch.cuda.synchronize()
        return out

    with torch.no_grad():
        res = time_calls(_torch_velocity, torch, *args[:3], t, args[3], repeats=repeats, sync=sync)
    return res.median_s, np.asarray(res.out.cpu()), f"torch {torch.__version__} ({dev})"


def _run_config(
    d, k, n, modes, repeats, peer, rates, coupling="joint", per_point=False
) -> list[dict]:
    c, x = _problem(d, k, n, T, jnp.float32, coupling == "independent")
    t32 = jnp.float32(T)
    ts = jax.random.uniform(jax.random.key(2), (n,), jnp.float32)
    arg, prepare_s = c, None
    if coupling == "independent":
        t0 = time.perf_counter()
        arg = jax.block_until_ready(fmjax.exact.prepare(c))
        prepare_s = time.perf_counter() - t0
    m = min(n, ACCURACY_POINTS)
    v64 = _reference(c, x, m)
    flops, nbytes = work(d, k, n)
    rows = []
    for mode in modes:
        row = {"d": d, "K": k, "N": n, "mode": mode, "flops": flops, "bytes": nbytes,
               "coupling": coupling, "prepare_s": prepare_s}  # fmt: skip
        try:
            compiled, compile_s = _compile(mode, arg, t32, x)
        except Exception as e:  # noqa: BLE001 - e.g. a dot algorithm this backend lacks
            row.update(status="unsupported", error=f"{type(e).__name__}: {e}"[:300])
            rows.append(row)
            print(f"  d={d} K={k} N={n} {mode}: unsupported", flush=True)
            continue
        res = time_calls(compiled, arg, t32, x, repeats=repeats)
        v = np.asarray(res.out[:m], np.float64)
        row.update(
            status="ok",
            compile_s=compile_s,
            median_s=res.median_s,
            times_s=res.times_s,
            points_per_s=n / res.median_s,
            gflops=flops / res.median_s / 1e9,
            rel_err_vs_f64=float(np.max(np.abs(v - v64)) / np.max(np.abs(v64))),
            **_memory(compiled, d, k, n),
            **roofline_fraction(res.median_s, flops, nbytes, rates, mode),
        )
        if per_point:
            pp, _ = _compile(mode, arg, ts, x)
            pp_s = time_calls(pp, arg, ts, x, repeats=repeats).median_s
            row.update(per_point_median_s=pp_s, per_point_ratio=pp_s / res.median_s)
        if peer and mode == "highest":
            got = _time_torch(c, x, T, repeats)
            if got is not None:
                t_peer, v_peer, name = got
                row["peer"] = "torch (batched)"
                row["peer_detail"] = name
                row["torch_median_s"] = t_peer
                row["torch_points_per_s"] = n / t_peer
                row["speedup_vs_torch"] = t_peer / res.median_s
                row["torch_max_abs_diff"] = float(np.max(np.abs(v_peer[:m] - v[:m])))
        rows.append(row)
        print(f"  d={d} K={k} N={n} {mode}: {row['points_per_s']:.3g} points/s", flush=True)
    return rows


def run(
    configs,
    scale,
    repeats,
    peer,
    modes=("highest",),
    memory_configs=(),
    rates=None,
    coupling="joint",
    per_point=None,
):
    """Time ``configs`` (N scaled) in each mode; ``memory_configs`` are run on an accelerator
    and only compiled (abstractly) on a CPU. ``per_point`` (default: for independent couplings)
    adds the one-t-per-point timing."""
    per_point = coupling == "independent" if per_point is None else per_point
    rates = machine_rates() if rates is None else rates
    if "bf16" in modes:
        add_bf16_rate(rates)
    rows, memory = [], []
    for d, k, n_full in configs:
        n = max(1, int(n_full * scale))
        rows += _run_config(d, k, n, modes, repeats, peer, rates, coupling, per_point)
    for d, k, n in memory_configs:
        memory.append(memory_only(d, k, n))
        if not on_cpu():
            rows += _run_config(d, k, n, modes, repeats, False, rates)
    return {"machine": machine(), "rates": rates, "modes": list(modes), "rows": rows,
            "memory": memory}  # fmt: skip


def summary_rows(result: dict) -> list[dict]:
    """Rows with the keys shared by all benchmarks (see benchmarks/__main__.py)."""
    out = []
    for r in result["rows"]:
        if r.get("status") != "ok":
            continue
        row = {
            "benchmark": "exact_velocity",
            "workload": f"d={r['d']} K={r['K']} N={r['N']} {r['mode']}"
            + (" independent" if r.get("coupling") == "independent" else ""),
            "precision": r["mode"],
            "median_s": r["median_s"],
            "compile_s": r["compile_s"],
            "throughput": r["points_per_s"],
            "unit": "points/s",
            "flops": r["flops"],
            "bytes": r["bytes"],
            "rel_err_vs_f64": r["rel_err_vs_f64"],
            "temp_bytes": r.get("temp_bytes"),
        }
        if "per_point_median_s" in r:
            row["per_point_median_s"] = r["per_point_median_s"]
        if "torch_median_s" in r:
            row.update(
                peer=r["peer"],
                peer_detail=r["peer_detail"],
                peer_median_s=r["torch_median_s"],
                peer_throughput=r["torch_points_per_s"],
                ratio=r["speedup_vs_torch"],
            )
        out.append(row)
    return out


def _mib(v):
    return None if v is None else v / 2**20


def print_tables(result: dict) -> None:
    mach = result["machine"]
    print(
        f"\nexact velocity, {mach['backend']} ({mach['device']}); measured "
        f"{rates_line(result['rates'])}"
    )
    rows = [
        {**r, "temp_mib": _mib(r.get("temp_bytes")), "naive_mib": _mib(r["naive_bytes"])}
        if r["status"] == "ok"
        else {**r, "points_per_s": None, "bound": "unsupported"}
        for r in result["rows"]
    ]
    print(
        format_table(
            rows,
            [
                ("d", "d", ""),
                ("K", "K", ""),
                ("N", "N", ""),
                ("mode", "mode", ""),
                ("compile_s", "compile s", ".2f"),
                ("median_s", "median s", ".4g"),
                ("per_point_median_s", "t per point s", ".4g"),
                ("per_point_ratio", "per-point / shared", ".2f"),
                ("points_per_s", "points/s", ".3g"),
                ("bound", "bound", ""),
                ("roofline_frac", "of roofline", ".1%"),
                ("rel_err_vs_f64", "rel err", ".1e"),
                ("temp_mib", "temp MiB", ".1f"),
                ("naive_mib", "naive MiB", ".1f"),
                ("torch_points_per_s", "torch pts/s", ".3g"),
                ("speedup_vs_torch", "x torch", ".2f"),
            ],
        )
    )
    if result["memory"]:
        print_memory(result["memory"])


def print_memory(rows: list[dict]) -> None:
    print("\ncompiled without running (abstract inputs): XLA memory analysis")
    print(
        format_table(
            [
                {**r, **{k: _mib(r[f"{k}_bytes"]) for k in ("argument", "output", "temp", "naive")}}
                for r in rows
            ],
            [
                ("d", "d", ""),
                ("K", "K", ""),
                ("N", "N", ""),
                ("compile_s", "compile s", ".2f"),
                ("argument", "arguments MiB", ".1f"),
                ("output", "output MiB", ".1f"),
                ("temp", "temp MiB", ".1f"),
                ("naive", "naive (N,K,d) MiB", ".1f"),
            ],
        )
    )


def _triples(values):
    return [tuple(int(v) for v in s.split(",")) for s in values]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--configs", nargs="*", help="d,K,N triples (default: the issue's three)")
    p.add_argument(
        "--scale",
        type=float,
        default=None,
        help="multiply N by this (default 1 on GPU or with --full, 0.05 on CPU)",
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--modes", nargs="+", choices=MODES, default=None, help="precision modes (default highest)"
    )
    p.add_argument(
        "--memory-only",
        nargs="+",
        metavar="d,K,N",
        default=None,
        help="only lower and compile these configs abstractly and report their memory",
    )
    p.add_argument(
        "--memory-configs",
        nargs="*",
        metavar="d,K,N",
        default=None,
        help="compiled abstractly (memory analysis) and, on an accelerator, also timed (full N, "
        "no peer); default none, (1024, 256, 100000) with --full",
    )
    p.add_argument(
        "--full",
        action="store_true",
        help="N x 1, all modes, and --memory-configs 1024,256,100000",
    )
    p.add_argument("--no-peer", action="store_true", help="skip the PyTorch peer")
    p.add_argument(
        "--coupling",
        choices=("joint", "independent"),
        default="joint",
        help="joint (cross-covariances, per-time path) or independent (prepared, time-free)",
    )
    p.add_argument(
        "--per-point",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time one t per point (default: on for independent couplings)",
    )
    p.add_argument("--out", default=None, help="JSON path")
    return p


def _main_memory_only(args, backend: str) -> dict:
    """``--memory-only``: compile the given configs abstractly, print and save their memory."""
    result = {
        "machine": machine(),
        "memory": [memory_only(*cfg) for cfg in _triples(args.memory_only)],
    }
    print_memory(result["memory"])
    save_results(result, args.out, f"exact_velocity_memory_{backend}.json")
    return result


def _scale(args) -> float:
    """--scale, else 1 with --full or on an accelerator, 0.05 on a CPU."""
    if args.scale is not None:
        return args.scale
    return 1.0 if args.full or not on_cpu() else 0.05


def _memory_configs(args):
    """--memory-configs, else the issue's memory config with --full, else none."""
    if args.memory_configs is not None:
        return _triples(args.memory_configs)
    return MEMORY_CONFIGS if args.full else ()


def main(argv=None, rates: dict | None = None) -> dict:
    args = _parser().parse_args(argv)
    backend = jax.default_backend()
    if args.memory_only:
        return _main_memory_only(args, backend)
    configs = _triples(args.configs) if args.configs else CONFIGS
    modes = args.modes or (list(MODES) if args.full else ["highest"])
    result = run(
        configs,
        _scale(args),
        args.repeats,
        not args.no_peer,
        modes,
        _memory_configs(args),
        rates,
        args.coupling,
        args.per_point,
    )
    print_tables(result)
    save_results(result, args.out, f"exact_velocity_{backend}.json")
    return result


if __name__ == "__main__":
    main()
