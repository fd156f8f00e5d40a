"""Unwritable output folders, run by tests/test_train.py in a subprocess that sees a read-only
bind mount and a 16 KiB tmpfs (``unshare -rm``: mounts need their own namespace)::

    python tests/_unwritable_check.py READ_ONLY_DIR FULL_DIR WRITABLE_DIR

READ_ONLY_DIR is an empty read-only folder, FULL_DIR a folder on a file system too small for a
checkpoint, WRITABLE_DIR an empty writable folder. Each case runs in this process; the last line
printed is one JSON object ``{case: [exception type, message, seconds]}``. The assertions are in
tests/test_train.py, which also times the whole process: a save that fails must not leave orbax
threads that keep it alive at exit (they used to wait 300 s).
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp

from fmjax import train
from fmjax.cli import main
from fmjax.train import pipeline

TINY = ["--data", "moons", "--width", "8", "--depth", "1", "--batch-size", "8", "--no-progress"]


def loss(params, key):
    return jnp.sum((params["w"] - jax.random.normal(key, (3,))) ** 2)


def fit(directory, steps=2):
    return train.fit(loss, {"w": jnp.zeros(3)}, key=jax.random.key(0), steps=steps,
                     checkpoint_dir=directory, progress=False)  # fmt: skip


def run(fn, *args) -> list:
    t0 = time.perf_counter()
    try:
        fn(*args)
        out = ["ok", ""]
    except SystemExit as e:
        out = ["SystemExit", str(e.code)]
    except Exception as e:  # noqa: BLE001 - reported to the test
        out = [type(e).__name__, str(e)]
    return [*out, time.perf_counter() - t0]


def main_check(read_only: str, full: str, writable: str) -> dict:
    results = {
        # The CLI first (it silences absl and asyncio for the rest of the process).
        "cli_train": run(main, ["train", "--steps", "2", *TINY, "--out", read_only]),
        "cli_train_new": run(main, ["train", "--steps", "2", *TINY, "--out", f"{read_only}/n"]),
        "cli_sample": run(main, ["sample", "--exact", "--n", "8", "--out", f"{read_only}/s"]),
        "fit": run(fit, read_only),
        "fit_new": run(fit, os.path.join(read_only, "ck")),
        "fit_full": run(fit, os.path.join(full, "ck")),
        "fit_control": run(fit, os.path.join(writable, "ck")),
    }
    # A folder that turns read-only after the check: the first save fails in orbax.
    pipeline.check_writable = lambda *args: None
    results["fit_save_fails"] = run(fit, read_only)
    return results


if __name__ == "__main__":
    print(json.dumps(main_check(*sys.argv[1:4])), flush=True)
