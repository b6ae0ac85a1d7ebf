"""Test configuration: float64 everywhere (ground truth), fixed keys, the persistent
compilation cache off (workers, notebooks and CLI subprocesses inherit it) except in the
test of the cache itself, and compiled programs released when a worker holds too many.

**Why the release.** Every XLA CPU executable keeps its machine code in a few memory
mappings of its own, and JAX keeps every executable it compiled for as long as the jitted
function lives (module-level functions live for the whole worker). A pytest worker that runs
a few hundred tests compiles thousands of programs: measured on the 2-core machine, a worker
running tests/test_objectives.py alone grew by about 180 mappings a second and passed 29,000
within 4 minutes. At Linux's default limit (`vm.max_map_count` = 65,530) the next mapping
fails and LLVM aborts the process ("Fatal Python error: Aborted" inside XLA's compilation or
`deserialize_executable`): this was the CI crash of 2026-12-02/06 in
test_estimation_on_a_path_from_toml, never reproduced alone. After every test the fixture
below counts the worker's mappings and, above `MAX_MAPPINGS`, drops JAX's caches
(`jax.clear_caches`), which frees those executables (the same module then stayed under
2,100 mappings); below it compiled programs are shared between tests as before."""

import gc
import os

os.environ["MCM_PROB_COMPILATION_CACHE"] = "off"

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

MAX_MAPPINGS = 20_000

# Heavy tests first: with pytest-xdist's `--maxschedchunk 1` (pyproject.toml) each worker takes
# the next test when it is free, so starting with the longest (a greedy longest-first schedule)
# keeps one worker from running a 4-minute test alone at the end. A test declares its cost with
# `@pytest.mark.heavy(seconds)` (measured with `pytest --durations=0` on the 2-core machine);
# notebooks, collected by nbmake, are weighed here.
NOTEBOOK_SECONDS = {
    "06_flow_map_objectives": 110,
    "03_estimation_error_study": 110,
    "04_sharing_results": 50,
    "01_data_and_forward_process": 40,
    "02_fit_and_sample": 40,
    "05_schedules": 20,
    "07_real_data": 55,
}


def _seconds(item) -> float:
    marker = item.get_closest_marker("heavy")
    if marker is not None:
        return marker.args[0]
    return NOTEBOOK_SECONDS.get(item.path.stem, 0) if item.path.suffix == ".ipynb" else 0


def pytest_collection_modifyitems(items):
    items.sort(key=_seconds, reverse=True)  # stable: the rest keep their order


def _mappings() -> int:
    """The number of memory mappings of this process (0 where /proc is absent)."""
    try:
        with open("/proc/self/maps", "rb") as maps:
            return sum(1 for _ in maps)
    except OSError:
        return 0


@pytest.fixture(autouse=True)
def _release_compiled_programs():
    """Drop JAX's caches after a test when the worker holds more than `MAX_MAPPINGS` memory
    mappings (module docstring)."""
    yield
    if _mappings() > MAX_MAPPINGS:
        jax.clear_caches()
        gc.collect()


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
