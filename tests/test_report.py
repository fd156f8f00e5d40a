"""fmjax._report: the one JSON writer, table formatter and timing helper."""

import dataclasses
import json
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fmjax._report import format_table, time_calls, to_json, write_json


class _Pair(NamedTuple):
    a: float
    b: jax.Array


@dataclasses.dataclass(frozen=True)
class _Cfg:
    sizes: tuple[int, ...]
    path: Path


def test_write_json_plain_types(tmp_path):
    obj = {
        "pair": _Pair(np.float32(1.5), jnp.arange(3)),
        "cfg": _Cfg((1, 2), Path("a/b.png")),
        "scalars": [np.int64(3), jnp.float32(2.0), np.bool_(True), float("nan"), None],
        "matrix": np.eye(2),
    }
    path = write_json(tmp_path / "sub" / "r.json", obj)
    back = json.loads(path.read_text())
    assert back == {
        "pair": {"a": 1.5, "b": [0, 1, 2]},
        "cfg": {"sizes": [1, 2], "path": "a/b.png"},
        "scalars": [3, 2.0, True, None, None],  # NaN -> null (JSON has no NaN)
        "matrix": [[1.0, 0.0], [0.0, 1.0]],
    }
    assert to_json(obj) == back  # what is returned is what is written


def test_format_table():
    rows = [{"model": "a", "x": 1.0, "y": None}, {"model": "bb", "x": 2.5, "y": 3.0}]
    lines = format_table(rows, ("model", "x", "y")).splitlines()
    assert lines[0].split() == ["model", "x", "y"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2].split() == ["a", "1", "-"] and lines[3].split() == ["bb", "2.5", "3"]
    assert lines[2].startswith("a ")  # names left, numbers right
    assert all(len(line) == len(lines[0]) for line in lines)
    table = format_table([{"n": 3, "t": 0.123456}], [("n", "N", "d"), ("t", "time s", ".2f")])
    assert table.splitlines()[2].split() == ["3", "0.12"]


def test_time_calls_counts_and_blocks():
    calls = []

    def fn(x):
        calls.append(1)
        return x + 1

    t = time_calls(fn, jnp.ones(3), repeats=4, warmup=2)
    assert len(calls) == 1 + 2 + 4 and len(t.times_s) == 4
    assert t.best_s <= t.median_s and t.compile_s >= 0 and t.first_s > 0
    np.testing.assert_array_equal(t.out, 2.0)
    synced = []
    time_calls(fn, 1.0, repeats=2, warmup=0, sync=lambda out: synced.append(out) or out)
    assert len(synced) == 3  # every call is synchronised, the first one too
