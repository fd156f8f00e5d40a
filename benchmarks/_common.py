"""Shared benchmark plumbing: timing, the machine's own rates, roofline fractions, tables, JSON.

Roofline: a call doing ``flops`` floating-point operations and moving ``bytes`` to or from main
memory cannot finish faster than ``max(flops / matmul_rate, bytes / copy_bandwidth)``, with both
rates measured on this machine in the same run (``machine_rates``). The fraction of the roofline
is that lower bound divided by the measured median; the bound is "compute" or "memory" after the
larger term. The flop and byte counts are per timed call and documented in each benchmark.
"""

from __future__ import annotations

import json
import math
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
        {"compile_s", "first_s", "median_s", "times_s"}: ``first_s`` is the first call (trace,
        compile, run); ``compile_s`` is ``first_s - median_s``. Each call is ended by
        ``block_until_ready``.
    """
    res = time_calls(lambda: fn(*args), repeats, jax.block_until_ready, warmup=1)
    return {
        "compile_s": max(0.0, res.first_s - res.median_s),
        "first_s": res.first_s,
        "median_s": res.median_s,
        "times_s": res.times_s,
    }


def on_cpu() -> bool:
    return jax.default_backend() == "cpu"


def default_matmul_n() -> int:
    """Side of the square matmul that measures the rate: 4096 on a CPU, 8192 on an accelerator."""
    return 4096 if on_cpu() else 8192


def default_copy_bytes() -> int:
    """Array size of the bandwidth measurement: 2^26 bytes on a CPU, 2^30 on an accelerator."""
    return 1 << 26 if on_cpu() else 1 << 30


def _best_time(fn: Callable, *args, repeats: int, min_time: float) -> float:
    """Shortest of at least ``repeats`` calls (and at least ``min_time`` s) after a warm-up."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    best, total, calls = math.inf, 0.0, 0
    while calls < repeats or total < min_time:
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        dt = time.perf_counter() - t0
        best, total, calls = min(best, dt), total + dt, calls + 1
    return best


def matmul_rate(
    n: int | None = None,
    precision: Any = "highest",
    dtype=jnp.float32,
    repeats: int = 5,
    min_time: float = 0.5,
) -> float:
    """Measured matmul rate of the default device in FLOP/s (n x n times n x n, float32 inputs).

    The best of at least ``repeats`` calls, and of as many as fit in ``min_time`` seconds, after
    a warm-up: the rate the machine can reach, an upper bound for the roofline (a median would
    let slow calls on a shared machine lower it).

    ``precision``: "highest" (full float32), "default" (TF32 for float32 on NVIDIA GPUs, plain
    float32 on a CPU) or a ``jax.lax.DotAlgorithmPreset`` such as ``BF16_BF16_F32``. ``n``
    defaults to 4096 on a CPU and 8192 on an accelerator.
    """
    n = n or default_matmul_n()
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(lambda a, b: jnp.matmul(a, b, precision=precision))
    return 2.0 * n**3 / _best_time(f, a, b, repeats=repeats, min_time=min_time)


def copy_bandwidth(nbytes: int | None = None, repeats: int = 5, min_time: float = 0.5) -> float:
    """Measured memory bandwidth of the default device in bytes/s, read + write counted.

    Times a jitted out-of-place ``y = x * s`` on a float32 array of ``nbytes`` (default 2^26 on a
    CPU, 2^30 on an accelerator: well beyond the caches). ``s`` is a traced argument and the
    input is not donated, so XLA cannot fold, elide or do the operation in place: every call
    reads ``nbytes`` and writes ``nbytes``. Best time as for ``matmul_rate``.
    """
    nbytes = nbytes or default_copy_bytes()
    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda x, s: x * s)
    best = _best_time(f, x, jnp.float32(1.0001), repeats=repeats, min_time=min_time)
    return 2.0 * x.size * 4 / best


# Keys of the rates dict: matmul precision mode -> FLOP/s, and the copy bandwidth in bytes/s.
RATE_KEYS = {"highest": "matmul_highest", "default": "matmul_default", "bf16": "matmul_bf16"}
BANDWIDTH_KEY = "copy_bytes_per_s"


def machine_rates(
    matmul_n: int | None = None, copy_bytes: int | None = None, bf16: bool = False
) -> dict:
    """The machine's matmul rates (precision highest, default, optionally bf16) and bandwidth."""
    rates = {
        RATE_KEYS["highest"]: matmul_rate(matmul_n, "highest"),
        RATE_KEYS["default"]: matmul_rate(matmul_n, "default"),
        BANDWIDTH_KEY: copy_bandwidth(copy_bytes),
        "matmul_n": matmul_n or default_matmul_n(),
        "copy_bytes": copy_bytes or default_copy_bytes(),
    }
    if bf16:
        add_bf16_rate(rates)
    return rates


def rates_line(rates: dict) -> str:
    """The measured rates in one line of text."""
    return (
        f"matmul float32 {rates[RATE_KEYS['highest']] / 1e9:.1f} GFLOP/s (highest), "
        f"{rates[RATE_KEYS['default']] / 1e9:.1f} GFLOP/s (default), "
        f"copy {rates[BANDWIDTH_KEY] / 1e9:.1f} GB/s (read + write)"
    )


def add_bf16_rate(rates: dict) -> dict:
    """Add the bf16-input (float32 accumulation) matmul rate to ``rates`` if it is missing.

    On a CPU, XLA accepts the preset but computes in float32.
    """
    if RATE_KEYS["bf16"] not in rates:
        preset = jax.lax.DotAlgorithmPreset.BF16_BF16_F32
        try:
            rates[RATE_KEYS["bf16"]] = matmul_rate(rates.get("matmul_n"), preset)
        except Exception:  # noqa: BLE001 - not supported by this backend
            rates[RATE_KEYS["bf16"]] = None
    return rates


def roofline_fraction(
    median_s: float, flops: float, nbytes: float, rates: dict, precision: str = "highest"
) -> dict:
    """Roofline time ``max(flops / matmul_rate, bytes / bandwidth)`` and its ratio to ``median_s``.

    ``precision`` picks the matmul rate ("highest", "default" or "bf16"). Returns
    {"roofline_s", "roofline_frac", "bound"} with bound "compute" or "memory"; values are None
    when a rate or a count is missing.
    """
    rate = rates.get(RATE_KEYS.get(precision, RATE_KEYS["highest"]))
    bandwidth = rates.get(BANDWIDTH_KEY)
    if not rate or not bandwidth or flops is None or nbytes is None or not median_s:
        return {"roofline_s": None, "roofline_frac": None, "bound": None}
    t_compute, t_memory = flops / rate, nbytes / bandwidth
    roofline_s = max(t_compute, t_memory)
    return {
        "roofline_s": roofline_s,
        "roofline_frac": roofline_s / median_s,
        "bound": "compute" if t_compute >= t_memory else "memory",
    }


def mlp_layers(sizes: list[int]) -> list[tuple[int, int]]:
    """(fan_in, fan_out) of each Dense layer of an MLP with layer sizes ``sizes``."""
    return list(zip(sizes[:-1], sizes[1:], strict=True))


def dense_layers(params) -> list[tuple[int, int]]:
    """(fan_in, fan_out) of every 2-D leaf (Dense kernel) of one model's parameter pytree."""
    return [tuple(a.shape) for a in jax.tree.leaves(params) if a.ndim == 2]


def _n_params(layers) -> int:
    return sum(i * o + o for i, o in layers)


def dense_flops_bytes(layers: list[tuple[int, int]], n: int, itemsize: int = 4):
    """FLOPs and bytes of one forward pass of Dense ``layers`` (fan_in, fan_out) on ``n`` points.

    FLOPs 2 n sum(fan_in fan_out) (the matmuls; biases and activations are O(n width)). Bytes:
    every layer reads its input and writes its output once, plus the parameters read once:
    ``itemsize * (n sum(fan_in + fan_out) + P)`` with P the parameter count.
    """
    flops = 2.0 * n * sum(i * o for i, o in layers)
    act = n * sum(i + o for i, o in layers)
    return flops, float(itemsize * (act + _n_params(layers)))


def training_flops_bytes(layers: list[tuple[int, int]], batch: int, itemsize: int = 4):
    """FLOPs and bytes of one Adam training step of Dense ``layers`` on ``batch`` points.

    FLOPs: 3x the forward matmuls (forward, and backward for inputs and for weights). Bytes: the
    activations 3x (written and read in the forward pass, read again in the backward pass) and
    the parameters 10x (read by forward and backward, gradient written, Adam reads parameters,
    gradient and two moments and writes parameters and two moments).
    """
    flops, _ = dense_flops_bytes(layers, batch, itemsize)
    act = batch * sum(i + o for i, o in layers)
    return 3.0 * flops, float(itemsize * (3 * act + 10 * _n_params(layers)))


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
