"""Shared benchmark plumbing: the machine's own rates, roofline fractions, flop and byte counts.

Roofline: a call doing ``flops`` floating-point operations and moving ``bytes`` to or from main
memory cannot finish faster than ``max(flops / matmul_rate, bytes / copy_bandwidth)``, with both
rates measured on this machine in the same run (``machine_rates``). The fraction of the roofline
is that lower bound divided by the measured median; the bound is "compute" or "memory" after the
larger term. The flop and byte counts are per timed call and documented in each benchmark.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from fmjax._report import time_calls, write_json

RESULTS_DIR = Path(__file__).parent / "results"


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
    return time_calls(fn, *args, repeats=repeats, warmup=1, min_time=min_time).best_s


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


def save_results(payload: dict, out: str | os.PathLike | None, default_name: str) -> Path:
    """Write ``payload`` as JSON to ``out`` (default ``benchmarks/results/default_name``)."""
    path = write_json(Path(out) if out else RESULTS_DIR / default_name, payload)
    print(f"wrote {path}")
    return path
