"""Orbax checkpoints of a train state and its loss history: saving, and restoring the latest one
(errors name the checkpoint's path)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fmjax import _checks
from fmjax._typing import PyTree

__all__ = ["Checkpointer", "restore"]


def _short(e: Exception, limit: int = 400) -> str:
    msg = str(e)
    return msg if len(msg) <= limit else msg[:limit] + " ..."


class Checkpointer:
    """Thin wrapper over ``orbax.checkpoint.CheckpointManager``.

    A checkpoint at step ``s`` lives in ``<directory>/<s>`` and holds two items: ``state`` (any
    pytree with an integer leaf ``step``) and ``history`` (a dict of arrays with a leading step
    axis of length ``s``).
    """

    def __init__(
        self, directory: str | os.PathLike, max_to_keep: int | None, fn: str = "train.fit"
    ):
        ocp = _checks.require("orbax.checkpoint", fn)
        self._ocp = ocp
        self.path = os.path.abspath(os.fspath(directory))
        try:
            self.manager = ocp.CheckpointManager(
                self.path,
                options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
            )
        except Exception as e:  # noqa: BLE001 - re-raised with the path
            raise RuntimeError(f"cannot open checkpoint directory {self.path}: {e}") from e

    def latest_step(self) -> int | None:
        """The latest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def restore(self, step: int, state_target: PyTree, hist_target: dict) -> tuple[PyTree, dict]:
        """Restore ``(state, history)`` of ``step`` into the structures of the targets.

        Raises:
            RuntimeError: naming the step directory, when it cannot be read or does not match.
        """
        ocp = self._ocp
        where = os.path.join(self.path, str(step))
        try:
            out = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(state_target),
                    history=ocp.args.StandardRestore(hist_target),
                ),
            )
            state, hist = out["state"], out["history"]
            restored_step = int(np.asarray(state.step))
        except Exception as e:  # noqa: BLE001 - any failure to read is reported with the path
            raise RuntimeError(
                f"checkpoint {where} is corrupt, incomplete or from a different model/optimizer "
                f"and cannot be restored ({type(e).__name__}: {_short(e)}). Nothing was "
                "overwritten; delete that step directory to fall back to an earlier "
                "checkpoint, or pass `resume=False` with an empty `checkpoint_dir`."
            ) from e
        if restored_step != step:
            raise RuntimeError(
                f"checkpoint {where} holds step {restored_step}, expected {step}; it is corrupt"
            )
        return state, hist

    def save(self, step: int, state: PyTree, hist: dict) -> None:
        """Save ``(state, history)`` as ``step`` (no-op if that step is already saved)."""
        ocp = self._ocp
        if self.manager.latest_step() == step:
            return
        # Host copies: the device buffers are donated to the next chunk while orbax writes.
        state, hist = jax.device_get((state, hist))
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), history=ocp.args.StandardSave(hist)
            ),
        )

    def close(self) -> None:
        """Wait for pending writes and release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


def restore(
    ckpt: Checkpointer,
    state: PyTree,
    history_target: Callable[[int], dict],
    *,
    steps: int,
    resume: bool,
    fn: str = "train.fit",
) -> tuple[PyTree, dict, int]:
    """The latest checkpoint of ``ckpt``: ``(state, history, start_step)``.

    Reads only: ``state`` (the initial state, whose structure the checkpoint must match) is not
    modified, and without a checkpoint it is returned with an empty history and step 0.

    Args:
        ckpt: the open checkpoint directory.
        state: initial train state (pytree with an integer leaf ``step``).
        history_target: ``n -> `` zeros shaped like the history of ``n`` steps.
        steps: steps the run asks for (a later checkpoint is returned with a warning).
        resume: continue from existing checkpoints; ``False`` refuses a non-empty directory.
        fn: the public function named in errors.

    Raises:
        ValueError: checkpoints exist and ``resume`` is False.
        RuntimeError: the latest checkpoint cannot be read or does not match ``state``.
    """
    latest = ckpt.latest_step()
    if latest is None:
        return state, history_target(0), 0
    if not resume:
        _checks.fail(
            fn, "checkpoint_dir", "empty with `resume=False` (pass `resume=True` to continue)",
            f"{ckpt.path} with checkpoints up to step {latest}",
        )  # fmt: skip
    restored, hist = ckpt.restore(latest, state, history_target(latest))
    if latest > steps:
        warnings.warn(
            f"{fn}: checkpoint in {ckpt.path} is at step {latest} > steps={steps}; "
            "returning it without training",
            stacklevel=5,
        )
    return jax.tree.map(jnp.asarray, restored), hist, latest
