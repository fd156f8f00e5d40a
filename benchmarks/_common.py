"""Shared benchmark plumbing: timing compiled calls, the machine's matmul rate, tables, JSON."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp

RESULTS_DIR = Path(__file__).parent / "results"


def time_compiled(fn: Callable, *args, repeats: int = 5, min_time: float = 0.0) -> dict:
    """Compile time and median run time of ``fn(*args)`` (a jitted function), after warm-up.

    Returns:
        {"compile_s", "median_s", "times_s"}: the first call (trace + compile + run) is reported
        as compile time; then one warm-up call, then ``repeats`` timed calls, each ended by
        ``block_until_ready``. With ``min_time`` > 0, repeats continue until that much time passed.
    """
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(fn(*args))
    times = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return {"compile_s": compile_s, "median_s": statistics.median(times), "times_s": times}


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
