"""Reporting for the CLI, the experiments and the benchmarks: JSON files, text tables, timings.

``write_json`` writes results (NumPy / JAX scalars and arrays, NamedTuples, dataclasses, paths)
as plain JSON; ``format_table`` lays rows of numbers out as an aligned text table; ``time_calls``
times a (compiled) function after warm-up, waiting for the device after every call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

__all__ = ["Timing", "format_table", "time_calls", "to_json", "write_json"]


def to_json(obj: Any) -> Any:
    """``obj`` as plain JSON types: dicts, lists, str, int, float, bool, None.

    NamedTuples and dataclasses become dicts of their fields, tuples and arrays lists, NumPy and
    JAX scalars Python numbers, paths strings; non-finite floats become None (JSON has no NaN).
    """
    if isinstance(obj, Mapping):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_asdict"):  # NamedTuple
        return to_json(obj._asdict())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_json({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)})
    if isinstance(obj, list | tuple | set | frozenset):
        return [to_json(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, np.ndarray | jax.Array | np.generic):
        value = np.asarray(obj)
        return to_json(value.tolist() if value.ndim else value.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``to_json(obj)`` to ``path`` (parent folders created, indented); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_json(obj), indent=2) + "\n")
    return path


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float | np.floating):
        return format(value, fmt or ".4g")
    return format(value, fmt) if fmt else str(value)


def format_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str | tuple[str, str, str]]
) -> str:
    """An aligned plain-text table: a header line, a rule, one line per row.

    Args:
        rows: one mapping per line, column key -> value (a missing key or None prints ``-``).
        columns: column keys, or ``(key, header, format)`` triples; floats default to the format
            ``.4g``. The first column is aligned left (row names), the others right.

    Returns:
        the table, lines joined by newlines (no trailing newline).
    """
    cols = [(c, c, "") if isinstance(c, str) else tuple(c) for c in columns]
    cells = [[header for _, header, _ in cols]]
    cells += [[_cell(row.get(key), fmt) for key, _, fmt in cols] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(cols))]

    def join(line):
        return "  ".join(s.ljust(w) if i == 0 else s.rjust(w) for i, (s, w) in enumerate(
            zip(line, widths, strict=True)))  # fmt: skip

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([join(cells[0]), rule] + [join(line) for line in cells[1:]])


class Timing(NamedTuple):
    """Timings of ``time_calls`` in seconds.

    Attributes:
        first_s: the first call (for jitted code: trace, compile and run).
        compile_s: ``first_s - median_s`` (at least 0): the compile time of jitted code.
        median_s: median of the timed calls.
        best_s: shortest timed call.
        times_s: every timed call.
        out: output of the last call.
    """

    first_s: float
    compile_s: float
    median_s: float
    best_s: float
    times_s: list[float]
    out: Any


def time_calls(
    fn: Callable,
    *args: Any,
    repeats: int = 5,
    warmup: int = 1,
    min_time: float = 0.0,
    sync: Callable[[Any], Any] = jax.block_until_ready,
) -> Timing:
    """Time ``fn(*args)``: the first call apart, then ``warmup`` untimed and the timed calls.

    Every call is ended by ``sync`` (default ``jax.block_until_ready``; another framework passes
    its own, e.g. a CUDA synchronize), so asynchronous dispatch is not mistaken for speed.

    Args:
        fn: the function, typically jitted.
        *args: its arguments.
        repeats: the least number of timed calls.
        warmup: untimed calls after the first one.
        min_time: keep timing calls until their total reaches this many seconds.
        sync: ``sync(out)`` waits until ``out`` is computed and returns it.
    """
    start = time.perf_counter()
    out = sync(fn(*args))
    first = time.perf_counter() - start
    for _ in range(warmup):
        out = sync(fn(*args))
    times: list[float] = []
    while len(times) < repeats or sum(times) < min_time:
        start = time.perf_counter()
        out = sync(fn(*args))
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return Timing(first, max(0.0, first - median), median, min(times), times, out)


@contextlib.contextmanager
def phase(what: str, enabled: bool = True):
    """A status line on stderr for a phase without a progress bar: ``what ...`` when it starts,
    `` 1.2 s`` when it ends (nothing when not ``enabled``). Used by the CLI and the experiments."""
    if not enabled:
        yield
        return
    print(f"{what} ...", end="", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        yield
    finally:
        print(f" {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
