"""Test configuration: float64 everywhere (ground truth), fixed keys."""

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def key():
    return jax.random.key(20250501)


@pytest.fixture
def rng():
    return np.random.default_rng(20250501)
