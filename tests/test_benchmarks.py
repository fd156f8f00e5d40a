"""The benchmark plumbing: machine rates, roofline fractions, the combined entry point (tiny)."""

import json
import math

import pytest

from benchmarks import exact_velocity
from benchmarks.__main__ import main
from benchmarks._common import copy_bandwidth, roofline_fraction

ROW_KEYS = {
    "benchmark",
    "workload",
    "median_s",
    "compile_s",
    "throughput",
    "unit",
    "flops",
    "bytes",
    "roofline_s",
    "roofline_frac",
    "bound",
}


def test_copy_bandwidth_is_positive():
    bw = copy_bandwidth(1 << 20, repeats=3, min_time=0.0)
    assert math.isfinite(bw) and bw > 0


def test_roofline_fraction_picks_the_bound():
    rates = {"matmul_highest": 100.0, "matmul_default": 400.0, "copy_bytes_per_s": 10.0}
    r = roofline_fraction(2.0, flops=100.0, nbytes=1.0, rates=rates)
    assert r == {"roofline_s": 1.0, "roofline_frac": 0.5, "bound": "compute"}
    r = roofline_fraction(2.0, flops=100.0, nbytes=1.0, rates=rates, precision="default")
    assert r["bound"] == "compute" and r["roofline_s"] == 0.25
    r = roofline_fraction(1.0, flops=1.0, nbytes=5.0, rates=rates)
    assert r == {"roofline_s": 0.5, "roofline_frac": 0.5, "bound": "memory"}
    assert roofline_fraction(1.0, 1.0, 1.0, {})["roofline_frac"] is None


def test_exact_velocity_compiles_abstractly_without_the_naive_intermediate():
    m = exact_velocity.memory_only(64, 64, 1_000_000)  # nothing allocated
    assert m["naive_bytes"] == 4 * 1_000_000 * 64 * 64
    if m["temp_bytes"] is not None:
        assert 0 < m["temp_bytes"] < m["naive_bytes"] / 4


def _check_summary(path, names):
    s = json.loads(path.read_text())
    assert {"machine", "rates", "rows", "failed"} <= s.keys() and s["failed"] == []
    for key in ("matmul_highest", "matmul_default", "copy_bytes_per_s"):
        assert math.isfinite(s["rates"][key]) and s["rates"][key] > 0
    assert {r["benchmark"] for r in s["rows"]} == set(names)
    for r in s["rows"]:
        assert ROW_KEYS <= r.keys(), r
        assert r["median_s"] > 0 and r["throughput"] > 0 and r["flops"] > 0 and r["bytes"] > 0
        assert r["bound"] in ("compute", "memory")
        # Measured rates bound the work from above (the last factor is slack for noise).
        assert math.isfinite(r["roofline_frac"]) and 0 < r["roofline_frac"] <= 1.5, r
    return s


def test_combined_entry_point_tiny(tmp_path, capsys):
    out = tmp_path / "summary.json"
    only = ["exact_velocity", "sampling", "exact_workloads"]
    argv = ["--tiny", "--no-peer", "--only", *only, "--results-dir", str(tmp_path)]
    assert main([*argv, "--out", str(out)]) == 0
    s = _check_summary(out, only)
    for name in only:
        assert (tmp_path / f"{name}.json").is_file(), name
    # exact workloads: marginal_fm rows carry cfm (same run) as their peer
    ew = [r for r in s["rows"] if r["benchmark"] == "exact_workloads"]
    assert sum(r.get("peer") == "cfm" for r in ew) == 3 and ew[-1]["peer"] == "raw coupling"
    assert {r["precision"] for r in s["rows"] if r["benchmark"] == "exact_velocity"} == {
        "highest",
        "bf16",
    }
    assert s["memory"] and s["memory"][0]["d"] == 32  # the --tiny memory config, compiled only
    printed = capsys.readouterr().out
    assert "of roofline" in printed and "summary" in printed


@pytest.mark.slow
def test_combined_entry_point_tiny_all(tmp_path):
    out = tmp_path / "summary.json"
    assert main(["--tiny", "--no-peer", "--results-dir", str(tmp_path), "--out", str(out)]) == 0
    _check_summary(out, ["exact_velocity", "train_throughput", "sampling", "many_models"])
