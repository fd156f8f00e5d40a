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
