"""Orbax checkpoints of a train state and its loss history, with errors that name the path."""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

PyTree = Any


def _short(e: Exception, limit: int = 400) -> str:
    msg = str(e)
    return msg if len(msg) <= limit else msg[:limit] + " ..."


class Checkpointer:
    """Thin wrapper over ``orbax.checkpoint.CheckpointManager``.

    A checkpoint at step ``s`` lives in ``<directory>/<s>`` and holds two items: ``state`` (any
    pytree with an integer leaf ``step``) and ``history`` (a dict of arrays with a leading step
    axis of length ``s``).
    """

    def __init__(self, directory: str | os.PathLike, max_to_keep: int | None):
        import orbax.checkpoint as ocp

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
