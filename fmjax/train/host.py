"""Host-side bookkeeping of a fit between its compiled chunks: the loss history, the progress
bar and user callback, and where chunks end."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

__all__ = ["History", "Progress", "chunk_bounds"]


class History:
    """Loss (and aux) of every step on the host, gathered chunk by chunk; step axis first."""

    def __init__(self, loss_struct, aux_struct, has_aux: bool):
        self.loss_struct, self.aux_struct, self.has_aux = loss_struct, aux_struct, has_aux
        self.losses: list[np.ndarray] = []
        self.auxes: list[Any] = []

    def append(self, losses, auxes) -> None:
        """Add the rows of some steps (``auxes`` is ignored without aux)."""
        self.losses.append(np.asarray(losses))
        if self.has_aux:
            self.auxes.append(jax.tree.map(np.asarray, auxes))

    def target(self, n: int) -> dict:
        """Zeros shaped like the history of ``n`` steps (a restore target)."""
        zeros = lambda s: np.zeros((n, *s.shape), s.dtype)  # noqa: E731
        out = {"loss": zeros(self.loss_struct)}
        if self.has_aux:
            out["aux"] = jax.tree.map(zeros, self.aux_struct)
        return out

    def as_dict(self) -> dict:
        """``{"loss": (steps, ...), "aux": ...}`` of every step so far (no "aux" without aux)."""
        if not self.losses:
            return self.target(0)
        out = {"loss": np.concatenate(self.losses, axis=0)}
        if self.has_aux:
            out["aux"] = jax.tree.map(lambda *a: np.concatenate(a, axis=0), *self.auxes)
        return out


def chunk_bounds(
    start: int, stop: int, chunk_len: int, checkpoint_every: int | None
) -> Iterator[tuple[int, int]]:
    """``(begin, end)`` of each chunk: at most ``chunk_len`` steps, cut at checkpoint steps."""
    b = start
    while b < stop:
        e = min(b + chunk_len, stop)
        if checkpoint_every is not None:
            e = min(e, (b // checkpoint_every + 1) * checkpoint_every)
        yield b, e
        b = e


class Progress:
    """tqdm bar (loss, excess over ``floor``, steps/s) and the user callback, between chunks."""

    def __init__(
        self,
        enabled: bool,
        start: int,
        steps: int,
        floor: float | None,
        callback: Callable | None,
        desc: str = "fit",
    ):
        self.bar = None
        if enabled and steps > start:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=steps, initial=start, desc=desc, unit="step", dynamic_ncols=True)
        self.start, self.floor, self.callback = start, floor, callback
        self.t0 = time.perf_counter()

    def __call__(self, end: int, losses: np.ndarray, aux) -> None:
        if self.bar is not None:
            mean = float(np.mean(losses))
            post = {"loss": f"{mean:.4g}"}
            if self.floor is not None:
                post["excess"] = f"{mean - self.floor:.3g}"
            rate = (end - self.start) / max(time.perf_counter() - self.t0, 1e-9)
            post["steps/s"] = f"{rate:.4g}"
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(len(losses))
        if self.callback is not None:
            self.callback(end, losses, aux)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
