"""Reuse of compiled training programs across fits: a bounded memo and the abstract
signatures of arguments and of the JAX configuration that its keys are made of."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import jax

__all__ = ["LRU", "TRACE_FLAGS", "signature", "trace_config"]

# Config read while tracing: a program traced under other values computes something else
# (dtypes, matmul precision, random bits) or would not trace at all.
TRACE_FLAGS = (
    "jax_enable_x64",
    "jax_default_matmul_precision",
    "jax_default_prng_impl",
    "jax_threefry_partitionable",
    "jax_numpy_dtype_promotion",
    "jax_numpy_rank_promotion",
)


def trace_config() -> tuple:
    """Current values of :data:`TRACE_FLAGS` (context managers included)."""
    return tuple(getattr(jax.config, name) for name in TRACE_FLAGS)


def signature(tree: Any, shardings: bool = True) -> tuple:
    """Abstract signature of a pytree: its structure and each leaf's aval (shape, dtype, weak
    type) and, with ``shardings``, its sharding. ``TypeError`` on a non-array leaf."""
    leaves, treedef = jax.tree.flatten(tree)
    if not shardings:
        return treedef, tuple(jax.typeof(x) for x in leaves)
    return treedef, tuple((jax.typeof(x), getattr(x, "sharding", None)) for x in leaves)


class LRU:
    """A bounded least-recently-used memo; thread-safe, ``make`` runs outside the lock."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get_or_make(self, key_fn: Callable[[], tuple], make: Callable[[], Any]) -> tuple[Any, bool]:
        """``(value, hit)``: the value stored under ``key_fn()``, else ``make()`` (then stored).

        A key that cannot be built or hashed (``TypeError``: an unhashable ``loss_fn`` or
        optimizer, a non-array leaf) bypasses the cache: ``make()`` every time.
        """
        try:
            key = key_fn()
            hash(key)
        except TypeError:
            key = None
        if key is not None:
            with self._lock:
                if key in self._items:
                    self._items.move_to_end(key)
                    return self._items[key], True
        value = make()
        if key is not None:
            with self._lock:
                self._items[key] = value
                while len(self._items) > self.size:
                    self._items.popitem(last=False)
        return value, False
