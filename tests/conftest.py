"""Test configuration: float64 everywhere (ground truth), fixed keys, and the persistent
compilation cache off (workers, notebooks and CLI subprocesses inherit it) except in the
test of the cache itself: XLA aborted twice while loading a cached executable that two
workers shared (see `mcm_prob.cache`, "Known fault")."""

import os

os.environ["MCM_PROB_COMPILATION_CACHE"] = "off"

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def key():
    return jax.random.key(20250501)


@pytest.fixture
def rng():
    return np.random.default_rng(20250501)


def _undescribed(tree) -> list[str]:
    """Variables without a `long_name` and coordinates without `units` or `long_name` (the
    sampler's chain and draw indices excepted), in every group of a results tree."""
    missing = []
    for node in tree.subtree:
        ds = node.to_dataset(inherit=False)
        missing += [f"{node.path}: {v}" for v in ds.data_vars if not ds[v].attrs.get("long_name")]
        missing += [
            f"{node.path}: coordinate {c}"
            for c in ds.coords
            if c not in ("chain", "draw") and not {"units", "long_name"} & set(ds[c].attrs)
        ]
    return missing


@pytest.fixture
def undescribed():
    """DESIGN's result contract: every variable has a long_name, every coordinate units or a
    long_name. Returns the list of what is missing (empty when the file is described)."""
    return _undescribed
