"""Run every benchmark on the current JAX backend: ``python -m benchmarks [--full] [--only NAME]``.

Each benchmark prints its own table (medians after warm-up, the peer measured in the same run
where it is importable) and writes JSON under benchmarks/results/. ``--full`` selects the
issue-sized workloads (meant for a GPU); the default sizes finish in a few minutes on a CPU.
"""

from __future__ import annotations

import argparse
import importlib
import time
import traceback

BENCHMARKS = {
    "exact_velocity": lambda full: ["--scale", "1"] if full else [],
    "train_throughput": lambda full: ["--full"] if full else [],
    "sampling": lambda full: ["--full"] if full else [],
    "many_models": lambda full: ["--full"] if full else [],
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--full", action="store_true", help="issue-sized workloads (GPU)")
    p.add_argument("--only", nargs="*", choices=sorted(BENCHMARKS), help="run only these")
    args = p.parse_args(argv)
    failed = []
    for name in args.only or BENCHMARKS:
        try:
            module = importlib.import_module(f"benchmarks.{name}")
        except ModuleNotFoundError:
            print(f"\n=== {name}: not available in this checkout, skipped")
            continue
        print(f"\n=== {name}", flush=True)
        start = time.perf_counter()
        try:
            module.main(BENCHMARKS[name](args.full))
        except Exception:  # one broken benchmark should not hide the others' numbers
            traceback.print_exc()
            failed.append(name)
        print(f"=== {name}: {time.perf_counter() - start:.1f} s", flush=True)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
