"""Shared benchmark plumbing: timing compiled calls, the machine's matmul rate, tables, JSON."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

RESULTS_DIR = Path(__file__).parent / "results"


class Timing(NamedTuple):
    first_s: float  # the first call: for jitted code, trace + compile + run
    median_s: float
    times_s: list[float]
    out: Any  # output of the last call


def time_calls(
    fn: Callable[[], Any], repeats: int, sync: Callable = lambda out: out, warmup: int = 0
) -> Timing:
    """Time ``sync(fn())`` in any framework; ``sync`` waits for the device (block_until_ready).

    The first call is reported apart, then ``warmup`` untimed calls, then ``repeats`` timed ones.
    """
    t0 = time.perf_counter()
    out = sync(fn())
    first_s = time.perf_counter() - t0
    for _ in range(warmup):
        out = sync(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = sync(fn())
        times.append(time.perf_counter() - t0)
    return Timing(first_s, statistics.median(times), times, out)


def time_compiled(fn: Callable, *args, repeats: int = 5) -> dict:
    """Compile time and median run time of the jitted ``fn(*args)`` after one warm-up call.

    Returns:
        {"compile_s", "median_s", "times_s"}; each call is ended by ``block_until_ready``.
    """
    res = time_calls(lambda: fn(*args), repeats, jax.block_until_ready, warmup=1)
    return {"compile_s": res.first_s, "median_s": res.median_s, "times_s": res.times_s}


def matmul_rate(n: int = 4096, precision: str = "highest", dtype=jnp.float32) -> float:
    """Measured float32 matmul rate of the default device in FLOP/s (n x n times n x n)."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(lambda a, b: jnp.matmul(a, b, precision=precision))
    res = time_compiled(f, a, b, repeats=5)
    return 2.0 * n**3 / res["median_s"]


def machine() -> dict:
    dev = jax.devices()[0]
    return {
        "backend": jax.default_backend(),
        "device": getattr(dev, "device_kind", str(dev)),
        "n_devices": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """Print rows as an aligned table; columns are (key, header, format)."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        line = []
        for key, _, fmt in columns:
            v = r.get(key)
            line.append("-" if v is None else format(v, fmt) if fmt else str(v))
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    for i, line in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def write_json(payload: dict, out: str | os.PathLike | None, default_name: str) -> Path:
    path = Path(out) if out else RESULTS_DIR / default_name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=float))
    print(f"wrote {path}")
    return path
