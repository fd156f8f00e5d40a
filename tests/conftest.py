"""Shared fixtures: float64 switch, PRNG keys, strict rank promotion for the whole session."""

import jax
import pytest

# Catch the (n,) vs (n, 1) broadcasting bugs: implicit rank promotion raises in tests.
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def x64():
    """Run a test in float64; restores the previous setting afterwards."""
    prev = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", prev)


@pytest.fixture
def key():
    return jax.random.key(0)


class _CompileCounter:
    """Counts XLA backend compilations (every jit, eager op or scan) while active."""

    def __init__(self):
        self.n = 0

    def __call__(self, event: str, duration: float, **_) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            self.n += 1

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self)


@pytest.fixture
def count_compiles():
    """``with count_compiles() as c: ...`` then ``c.n`` is the number of XLA compilations."""
    return _CompileCounter


@pytest.fixture
def kernel_calls(monkeypatch):
    """The names of the exact engine's kernels (rows of ``fmjax.exact._plan``'s table B) called
    while the test runs, in order (under an outer jit: at trace time)."""
    from fmjax.exact import _plan

    calls = []

    def spy(name, kernel):
        def run(*args, **kwargs):
            calls.append(name)
            return kernel(*args, **kwargs)

        return run

    for name, kernel in list(_plan.KERNELS.items()):
        monkeypatch.setitem(_plan.KERNELS, name, spy(name, kernel))
    return calls
