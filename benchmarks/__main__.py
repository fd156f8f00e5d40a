"""Run every benchmark on the current JAX backend and print one combined table.

    python -m benchmarks                    # default sizes (a few minutes on a CPU)
    python -m benchmarks --full             # the issue-sized workloads (meant for a GPU)
    python -m benchmarks --tiny --no-peer   # tiny sizes: checks that everything runs
    python -m benchmarks --only exact_velocity sampling

(``python -m benchmarks.run`` is the same.) First the machine's own rates are measured: float32
matmul at precision "highest" (full float32) and "default" (TF32 on NVIDIA GPUs) and the copy
bandwidth (benchmarks/_common.py). Then each benchmark runs, prints its own table and writes its
JSON under benchmarks/results/. The rates are measured again at the end and the roofline uses
the better reading of each (both are kept in the JSON). Last, one table: per workload the
compile time, the median time of one call after warm-up, the throughput, the roofline bound
(compute or memory) and the fraction of the roofline reached (roofline time max(flops / matmul
rate of the workload's precision, bytes / copy bandwidth) over the median; the flop and byte
counts are documented in each benchmark's docstring), the peer measured in the same run (a
batched PyTorch version for the exact velocity, Meta's ``flow_matching`` for training, sampling
and likelihood, a Python loop of ``fit`` for many models) and the ratio peer time / fmjax time
(> 1: fmjax is faster). Machine, rates and rows go to benchmarks/results/summary_<backend>.json.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import math
import time
import traceback
from pathlib import Path

from benchmarks._common import (
    BANDWIDTH_KEY,
    RATE_KEYS,
    RESULTS_DIR,
    machine,
    machine_rates,
    rates_line,
    roofline_fraction,
    save_results,
)
from fmjax._report import format_table

# Arguments of each benchmark script for the default (CPU-sized), --full and --tiny runs.
BENCHMARKS = {
    "exact_velocity": {
        "default": [],
        "full": ["--full"],
        "tiny": ["--configs", "2,8,2000", "16,16,1000", "--scale", "1", "--repeats", "3",
                 "--modes", "highest", "bf16", "--memory-configs", "32,8,1000"],
    },
    "train_throughput": {
        "default": [],
        "full": ["--full"],
        "tiny": ["--batch", "64", "--steps", "40", "--segments", "4", "--width", "32",
                 "--depth", "2", "--eval-size", "256"],
    },
    "sampling": {
        "default": [],
        "full": ["--full"],
        "tiny": ["--n-samples", "256", "--grid", "8", "--gmm-samples", "64", "--gmm-dim", "4",
                 "--gmm-components", "4", "--repeats", "2"],
    },
    "exact_workloads": {
        "default": [],
        "full": ["--full"],
        "tiny": ["--tiny", "--repeats", "1"],
    },
    "many_models": {
        "default": [],
        "full": ["--full"],
        "tiny": ["--models", "3", "--steps", "10", "--batch", "32", "--width", "8",
                 "--depth", "1", "--loop-models", "1"],
    },
}  # fmt: skip
WITH_PEER = {"exact_velocity", "train_throughput", "sampling"}  # take --no-peer
TINY_RATES = {"matmul_n": 2048, "copy_bytes": 1 << 24}

COLUMNS = [
    ("benchmark", "benchmark", ""),
    ("workload", "workload", ""),
    ("compile_s", "compile s", ".2f"),
    ("median_s", "median s", ".4g"),
    ("throughput_text", "throughput", ""),
    ("bound", "bound", ""),
    ("roofline_frac", "of roofline", ".1%"),
    ("peer", "peer", ""),
    ("peer_throughput_text", "peer throughput", ""),
    ("ratio", "ratio", ".2f"),
]


def _with_roofline(row: dict, rates: dict) -> dict:
    row = dict(row)
    row.update(
        roofline_fraction(
            row["median_s"], row["flops"], row["bytes"], rates, row.get("precision", "highest")
        )
    )
    row["throughput_text"] = f"{row['throughput']:.3g} {row['unit']}"
    if row.get("peer_throughput") is not None:
        row["peer_throughput_text"] = f"{row['peer_throughput']:.3g} {row['unit']}"
    return row


# The measured rates in a rates dict (the other keys are the measurement sizes).
MEASURED = (*RATE_KEYS.values(), BANDWIDTH_KEY)


def _best_rates(a: dict, b: dict) -> dict:
    best = {**b, **a}
    for key in MEASURED:
        values = [r[key] for r in (a, b) if r.get(key)]
        if values:
            best[key] = max(values)
    return best


def _differ(x, y, tol: float = 0.2) -> bool:
    return bool(x and y) and abs(x - y) > tol * max(x, y)


def _mib(v) -> str:
    return "n/a" if v is None else f"{v / 2**20:.1f} MiB"


def _json_safe(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="issue-sized workloads (GPU)")
    size.add_argument("--tiny", action="store_true", help="tiny sizes: a check that all runs")
    p.add_argument("--only", nargs="*", choices=sorted(BENCHMARKS), help="run only these")
    p.add_argument("--no-peer", action="store_true", help="skip the peers (torch)")
    p.add_argument("--matmul-n", type=int, default=None, help="matmul size for the rate")
    p.add_argument("--copy-bytes", type=int, default=None, help="array size for the bandwidth")
    p.add_argument(
        "--results-dir",
        default=None,
        help="folder for each benchmark's JSON (default: each script's own path)",
    )
    p.add_argument("--out", default=None, help="summary JSON path")
    return p


def _rate_args(args) -> tuple:
    """(matmul size, copy bytes) for ``machine_rates``: the flags, else the tiny sizes or None."""
    tiny = TINY_RATES if args.tiny else {}
    return args.matmul_n or tiny.get("matmul_n"), args.copy_bytes or tiny.get("copy_bytes")


def _measure_start(mach: dict, rate_args: tuple) -> dict:
    """Print the machine, measure its rates (timed) and print them."""
    print(f"machine: {mach['backend']} ({mach['device']}), {mach['cpu_count']} CPUs", flush=True)
    start = time.perf_counter()
    rates = machine_rates(*rate_args)
    print(f"measured in {time.perf_counter() - start:.1f} s: {rates_line(rates)}", flush=True)
    return rates


def _benchmark_argv(name: str, sizes: str, args) -> list[str]:
    argv_b = list(BENCHMARKS[name][sizes])
    if args.no_peer and name in WITH_PEER:
        argv_b.append("--no-peer")
    if args.results_dir:
        argv_b += ["--out", str(Path(args.results_dir) / f"{name}.json")]
    return argv_b


def _call_main(module, argv_b: list[str], rates: dict) -> dict:
    """A benchmark's ``main``, given the measured rates when it takes them."""
    kwargs = {"rates": rates} if "rates" in inspect.signature(module.main).parameters else {}
    return module.main(argv_b, **kwargs)


def _run_all(names, sizes: str, args, rates: dict) -> tuple[list, list, dict, list]:
    """Run each benchmark in turn; returns (raw rows, failed names, elapsed s by name, memory)."""
    raw, failed, elapsed, memory = [], [], {}, []
    for name in names:
        try:
            module = importlib.import_module(f"benchmarks.{name}")
        except ModuleNotFoundError:
            print(f"\n=== {name}: not available in this checkout, skipped")
            continue
        argv_b = _benchmark_argv(name, sizes, args)
        print(f"\n=== {name} {' '.join(argv_b)}", flush=True)
        t0 = time.perf_counter()
        try:
            result = _call_main(module, argv_b, rates)
            raw += module.summary_rows(result)
            memory += result.get("memory", [])
        except (Exception, SystemExit):  # one broken benchmark must not hide the others' numbers
            traceback.print_exc()
            failed.append(name)
        elapsed[name] = time.perf_counter() - t0
        print(f"=== {name}: {elapsed[name]:.1f} s", flush=True)
    return raw, failed, elapsed, memory


def _measure_end(rates: dict, rate_args: tuple) -> tuple[dict, dict]:
    """Measure the rates again; returns (the better reading of each, the end reading).

    A shared machine's load can change during the run: a low first reading would overstate the
    fractions, so the roofline uses the better of the two.
    """
    rates_end = machine_rates(*rate_args)
    best = _best_rates(rates, rates_end)
    print(f"\nmeasured again: {rates_line(rates_end)}")
    changed = [k for k in MEASURED if _differ(rates.get(k), rates_end.get(k))]
    if changed:
        print(
            f"note: {', '.join(changed)} changed by more than 20% during the run (shared machine?)"
        )
    return best, rates_end


def _print_summary(mach: dict, rows: list[dict], memory: list[dict], failed: list[str]) -> None:
    print(
        f"\nsummary, {mach['backend']} ({mach['device']}): median after warm-up; roofline = "
        "max(flops / matmul rate, bytes / copy bandwidth), the better of the two measurements; "
        "ratio = peer time / fmjax time"
    )
    print(format_table(rows, COLUMNS))
    for m in memory:
        print(
            f"exact_velocity d={m['d']} K={m['K']} N={m['N']} compiled without running: "
            f"temp {_mib(m['temp_bytes'])}, arguments {_mib(m['argument_bytes'])} "
            f"(naive (N, K, d) intermediate: {_mib(m['naive_bytes'])})"
        )
    if failed:
        print(f"\nfailed: {', '.join(failed)}")


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    sizes = "full" if args.full else "tiny" if args.tiny else "default"
    rate_args = _rate_args(args)
    mach = machine()
    rates = _measure_start(mach, rate_args)
    raw, failed, elapsed, memory = _run_all(args.only or BENCHMARKS, sizes, args, rates)
    best, rates_end = _measure_end(rates, rate_args)
    rows = [_with_roofline(r, best) for r in raw]
    _print_summary(mach, rows, memory, failed)
    summary = {
        "machine": mach,
        "sizes": sizes,
        "rates": best,
        "rates_start": rates,
        "rates_end": rates_end,
        "rows": [{k: _json_safe(v) for k, v in r.items() if not k.endswith("_text")} for r in rows],
        "memory": memory,
        "elapsed_s": elapsed,
        "failed": failed,
    }
    name = f"summary_{mach['backend']}.json"
    save_results(summary, args.out or Path(args.results_dir or RESULTS_DIR) / name, name)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
