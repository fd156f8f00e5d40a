"""Orbax checkpoints of a train state and its loss history: saving with a checksum and the run's
fingerprint, restoring the latest one after verifying both (errors name the checkpoint's path),
and an exclusive lock on the directory while a run uses it."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fmjax import _checks
from fmjax._typing import PyTree

try:  # POSIX; elsewhere the directory is not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

__all__ = [
    "Checkpointer",
    "check_writable",
    "checksum",
    "lock_directory",
    "restore",
    "unlock_directory",
    "unwritable",
]

_FORMAT = 1  # version of the "meta" item


def _short(e: Exception, limit: int = 400) -> str:
    msg = str(e)
    return msg if len(msg) <= limit else msg[:limit] + " ..."


def _cause(e: Exception) -> str:
    """The operating system's reason for a failed write ("No space left on device", ...), from
    an ``OSError`` or the error code tensorstore puts in its message; else the message."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    code = re.search(r"os_error_code='?(\d+)", str(e))
    if code:
        return os.strerror(int(code.group(1)))
    return f"{type(e).__name__}: {_short(e, 200)}"


def checksum(tree: PyTree) -> str:
    """sha256 over the dtype, shape and bytes of every leaf of ``tree`` (host copies), in order."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(jax.device_get(tree)):
        arr = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{arr.dtype.str}{arr.shape};".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def unwritable(path: str | os.PathLike) -> str | None:
    """Why the folder ``path`` cannot be written to, or ``None`` when it can: it is created
    if missing (with its parents), then a probe file is written, flushed and removed in it.
    A read-only file system, a folder without write permission or a full disk fail here in
    milliseconds, before a run does any work (orbax would fail only at its first save)."""
    path = os.fspath(path)
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".fmjax-write-probe-", dir=path)
        try:
            os.write(fd, b"fmjax")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        return e.strerror or type(e).__name__
    return None


def check_writable(fn: str, name: str, path: str | os.PathLike) -> str:
    """``path`` as an absolute path if it is a folder that can be written to (created if
    missing); else ``ValueError`` naming ``fn``, the argument ``name``, the path and the reason
    (e.g. "Read-only file system", "No space left on device")."""
    path = os.path.abspath(os.fspath(path))
    why = unwritable(path)
    if why is not None:
        what = "a folder that can be created and written to"
        raise ValueError(f"{fn}: `{name}` must be {what}, got {path!r} ({why})")
    return path


def lock_directory(path: str | os.PathLike, message: str) -> int | None:
    """Take an exclusive ``flock`` on the existing directory ``path``; returns the descriptor
    that holds it (``None`` where ``fcntl`` is missing: not locked). ``RuntimeError(message)``
    if another open descriptor, in this process or another, holds it. The lock ends with
    :func:`unlock_directory` or when the process dies (SIGKILL included)."""
    if fcntl is None:
        return None
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        raise RuntimeError(message) from e
    return fd


def unlock_directory(fd: int | None) -> None:
    """Release a lock of :func:`lock_directory` (no-op for ``None``)."""
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock


class Checkpointer:
    """Thin wrapper over ``orbax.checkpoint.CheckpointManager`` that locks its directory.

    A checkpoint at step ``s`` lives in ``<directory>/<s>`` and holds three items: ``state`` (any
    pytree with an integer leaf ``step``), ``history`` (a dict of arrays with a leading step
    axis of length ``s``) and ``meta`` (JSON: the sha256 :func:`checksum` of state and history,
    and the fingerprint of the run that wrote it). While open, the directory is locked
    (``flock``, exclusive): a second ``Checkpointer`` on it, in this process or another, raises
    ``RuntimeError``; :meth:`close` releases it.
    """

    def __init__(
        self, directory: str | os.PathLike, max_to_keep: int | None, fn: str = "train.fit"
    ):
        ocp = _checks.require("orbax.checkpoint", fn)
        self._ocp, self.fn, self._lock = ocp, fn, None
        self.path = os.path.abspath(os.fspath(directory))
        try:
            if jax.process_index() == 0:  # the others see it through the shared file system
                os.makedirs(self.path, exist_ok=True)
        except OSError as e:
            raise RuntimeError(f"{fn}: cannot create checkpoint directory {self.path}: {e}") from e
        self._acquire()
        try:
            self.manager = ocp.CheckpointManager(
                self.path,
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=max_to_keep,
                    create=True,
                    # Step directories are made before save() returns, so that an unwritable
                    # folder fails there; made in the background, their failure left orbax's
                    # writer threads waiting 300 s for a signal, keeping the process alive.
                    async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
                ),
            )
        except Exception as e:  # noqa: BLE001 - re-raised with the path
            self._release()
            raise RuntimeError(f"cannot open checkpoint directory {self.path}: {e}") from e

    def _acquire(self) -> None:
        if jax.process_index() != 0:  # one lock per run: the processes share the directory
            return
        self._lock = lock_directory(
            self.path,
            f"{self.fn}: checkpoint directory {self.path} is in use by another run (it holds "
            "an exclusive lock on it); wait until that run ends, or give this run another "
            "`checkpoint_dir`",
        )

    def _release(self) -> None:
        fd, self._lock = self._lock, None
        unlock_directory(fd)

    def latest_step(self) -> int | None:
        """The latest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def _where(self, step: int) -> str:
        return os.path.join(self.path, str(step))

    def _corrupt(self, step: int, e: Exception) -> RuntimeError:
        return RuntimeError(
            f"checkpoint {self._where(step)} is corrupt, incomplete or from a different "
            f"model/optimizer and cannot be restored ({type(e).__name__}: {_short(e)}). Nothing "
            "was overwritten; delete that step directory to fall back to an earlier "
            "checkpoint, or pass `resume=False` with an empty `checkpoint_dir`."
        )

    def read_meta(self, step: int) -> dict | None:
        """The ``meta`` item of ``step`` (checksum, fingerprint), or None for a checkpoint
        written without one. ``RuntimeError`` naming the step directory if it is unreadable."""
        where = self._where(step)
        if not os.path.isdir(os.path.join(where, "meta")):
            return None
        try:
            out = self.manager.restore(
                step, args=self._ocp.args.Composite(meta=self._ocp.args.JsonRestore())
            )
            meta = out["meta"]
            if not isinstance(meta, dict) or "checksum" not in meta:
                raise ValueError(f"malformed metadata {meta!r:.200}")
        except Exception as e:  # noqa: BLE001 - reported with the path
            raise self._corrupt(step, e) from e
        return meta

    def restore(
        self, step: int, state_target: PyTree, hist_target: dict, meta: dict | None = None
    ) -> tuple[PyTree, dict]:
        """Restore ``(state, history)`` of ``step`` into the structures of the targets and check
        them against the checksum of ``meta`` (the :meth:`read_meta` of that step).

        Raises:
            RuntimeError: naming the step directory, when it cannot be read, does not match
                the targets, or its arrays do not match their checksum.
        """
        ocp = self._ocp
        where = self._where(step)
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
            raise self._corrupt(step, e) from e
        if restored_step != step:
            raise RuntimeError(
                f"checkpoint {where} holds step {restored_step}, expected {step}; it is corrupt"
            )
        if meta is not None and checksum((state, hist)) != meta["checksum"]:
            raise RuntimeError(
                f"checkpoint {where} is corrupt: its arrays do not match the sha256 checksum "
                "saved with them. Nothing was overwritten; delete that step directory to fall "
                "back to an earlier checkpoint, or pass `resume=False` with an empty "
                "`checkpoint_dir`."
            )
        return state, hist

    def save(self, step: int, state: PyTree, hist: dict, fingerprint: dict | None = None) -> None:
        """Save ``(state, history)`` as ``step`` with their checksum and the run's
        ``fingerprint`` (no-op if that step is already saved)."""
        ocp = self._ocp
        if self.manager.latest_step() == step:
            return
        # Host copies: the device buffers are donated to the next chunk while orbax writes.
        from fmjax.sharding import to_host

        state, hist = to_host((state, hist))
        meta = {"format": _FORMAT, "checksum": checksum((state, hist)),
                "fingerprint": fingerprint or {}}  # fmt: skip
        try:  # the previous save, still writing in the background, fails here
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - reported with its step
            raise self._unwritten(getattr(self, "_saving", step), e) from e
        self._saving = step
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    history=ocp.args.StandardSave(hist),
                    meta=ocp.args.JsonSave(meta),
                ),
            )
        except Exception as e:  # noqa: BLE001 - this save or the pending one failed to write
            raise self._unwritten(step, e) from e

    def _unwritten(self, step: int, e: Exception) -> RuntimeError:
        last = self.manager.latest_step()
        if last is None:
            kept = "no checkpoint was completed"
        else:
            kept = f"the last complete checkpoint is step {last}"
        return RuntimeError(
            f"{self.fn}: cannot write checkpoint {self._where(step)} ({_cause(e)}); {kept} "
            f"in {self.path}. Free space or make the folder writable, then run again to resume."
        )

    def close(self, check: bool = True) -> None:
        """Wait for pending writes, release the manager and the directory's lock. A write that
        failed raises ``RuntimeError`` (``check=False``: ignored, for a run that is already
        failing with another error)."""
        if getattr(self, "_closed", False):
            return
        self._closed = True
        error = None
        try:
            for end in (self.manager.wait_until_finished, self.manager.close):
                try:
                    end()
                except Exception as e:  # noqa: BLE001 - reported below with the path
                    error = error or e
        finally:
            self._release()
        if error is not None and check:
            raise self._unwritten(getattr(self, "_saving", 0), error) from error


def restore(
    ckpt: Checkpointer,
    state: PyTree,
    history_target: Callable[[int], dict],
    *,
    steps: int,
    resume: bool | str,
    fingerprint: dict | None = None,
    fn: str = "train.fit",
) -> tuple[PyTree, dict, int]:
    """The latest checkpoint of ``ckpt``: ``(state, history, start_step)``.

    Reads only: ``state`` (the initial state, whose structure the checkpoint must match) is not
    modified, and without a checkpoint it is returned with an empty history and step 0. The
    checkpoint's arrays are verified against the checksum saved with them.

    Args:
        ckpt: the open checkpoint directory.
        state: initial train state (pytree with an integer leaf ``step``).
        history_target: ``n -> `` zeros shaped like the history of ``n`` steps.
        steps: steps the run asks for (a later checkpoint is returned with a warning).
        resume: ``True``: continue from the latest checkpoint if the run's ``fingerprint``
            matches the saved one; ``"force"``: continue even if it differs (with a warning);
            ``False``: refuse a non-empty directory.
        fingerprint: the run's fingerprint (``None``: not compared).
        fn: the public function named in errors.

    Raises:
        ValueError: checkpoints exist and ``resume`` is False, or their fingerprint differs
            and ``resume`` is not ``"force"``.
        RuntimeError: the latest checkpoint cannot be read, does not match ``state`` or its
            checksum.
    """
    latest = ckpt.latest_step()
    if latest is None:
        return state, history_target(0), 0
    if not resume:
        _checks.fail(
            fn, "checkpoint_dir", "empty with `resume=False` (pass `resume=True` to continue)",
            f"{ckpt.path} with checkpoints up to step {latest}",
        )  # fmt: skip
    where = os.path.join(ckpt.path, str(latest))
    meta = ckpt.read_meta(latest)
    if meta is None:
        warnings.warn(
            f"{fn}: checkpoint {where} has no checksum or fingerprint (written by an older "
            "fmjax); restoring it unverified",
            stacklevel=5,
        )
    elif fingerprint is not None:
        from fmjax.train.fingerprint import differences

        diff = differences(meta.get("fingerprint", {}), fingerprint)
        if jax.process_count() > 1:  # one decision for all processes (else the others wait)
            from jax.experimental import multihost_utils

            differ = np.asarray(multihost_utils.process_allgather(np.asarray(bool(diff))))
            if differ.any() and not diff:
                where_ = np.flatnonzero(differ).tolist()
                diff = [f"the run of process(es) {where_} (every process must run the same)"]
        if diff and resume != "force":
            raise ValueError(
                f"{fn}: `checkpoint_dir` must hold checkpoints of the same run to resume it "
                "(same loss: its model, pairs or coupling, schedule, time sampler, target, "
                "reduction, divergence and batch size, or a function holding the same values; "
                "same optimizer, ema_decay, has_aux, params, key, and number of processes and "
                "devices; pass "
                "`resume='force'` to continue it with the new settings, or another directory to "
                f"start over), got {where}, which differs in " + "; ".join(diff)
            )
        if diff:
            warnings.warn(
                f"{fn}: resume='force': continuing {where} with new settings ("
                + "; ".join(diff) + ")",
                stacklevel=5,
            )  # fmt: skip
    restored, hist = ckpt.restore(latest, state, history_target(latest), meta)
    if latest > steps:
        warnings.warn(
            f"{fn}: checkpoint in {ckpt.path} is at step {latest} > steps={steps}; "
            "returning it without training",
            stacklevel=5,
        )
    return jax.tree.map(jnp.asarray, restored), hist, latest
