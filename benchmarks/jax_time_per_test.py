"""Where the test suite's time goes: JAX's tracing, lowering and XLA compilation per test.

A pytest plugin and its report. As a plugin it records, for every test it runs, the wall time
and JAX's own duration events (`jax.monitoring`): tracing to a jaxpr, lowering to MLIR and
XLA compilation (seconds and counts), and writes one JSON file per pytest worker into
``$MCM_PROB_TEST_PROFILE`` (default ``test_profile/``) when the session ends. Only work in the
pytest processes is seen: CLI subprocesses and notebook kernels count as wall time only.

    PYTHONPATH=benchmarks python -m pytest -q -p no:cacheprovider -p jax_time_per_test
    python benchmarks/jax_time_per_test.py test_profile          # the report
"""

from __future__ import annotations

import collections
import json
import os
import sys
import time
from pathlib import Path

import pytest

_EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
    "/jax/core/compile/backend_compile_duration": "compile",
}
_KEYS = ("wall", "trace_s", "lower_s", "compile_s", "compile_n")
_current: collections.Counter = collections.Counter()
_rows: list[dict] = []


def _on_duration(event: str, seconds: float, **_) -> None:
    kind = _EVENTS.get(event)
    if kind is not None:
        _current[f"{kind}_s"] += seconds
        _current[f"{kind}_n"] += 1


def pytest_configure(config):
    import jax

    jax.monitoring.register_event_duration_secs_listener(_on_duration)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _current.clear()
    start = time.perf_counter()
    yield
    _rows.append({"id": item.nodeid, "wall": time.perf_counter() - start, **_current})


def pytest_sessionfinish(session):
    if not _rows:  # the xdist controller runs no tests
        return
    out = Path(os.environ.get("MCM_PROB_TEST_PROFILE", "test_profile"))
    out.mkdir(parents=True, exist_ok=True)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    (out / f"{worker}.json").write_text(json.dumps(_rows))


def report(directory: str, top: int = 25) -> str:
    """Totals, per test file and the `top` tests by compilation time, from the JSON files."""
    rows = [r for f in sorted(Path(directory).glob("*.json")) for r in json.loads(f.read_text())]
    total = collections.Counter()
    files: dict = collections.defaultdict(collections.Counter)
    for r in rows:
        for k in _KEYS:
            total[k] += r.get(k, 0)
            files[r["id"].split("::")[0]][k] += r.get(k, 0)
        files[r["id"].split("::")[0]]["tests"] += 1

    def line(name, c):
        return (
            f"{c['wall']:8.1f} {c['compile_s']:8.1f} {int(c['compile_n']):7d} "
            f"{c['trace_s']:6.1f} {c['lower_s']:6.1f}  {name}"
        )

    head = f"{'wall s':>8} {'compile':>8} {'count':>7} {'trace':>6} {'lower':>6}"
    out = [f"{len(rows)} tests", head, line("all tests", total), "", "per file:", head]
    out += [line(f, c) for f, c in sorted(files.items(), key=lambda kv: -kv[1]["wall"])]
    out += ["", f"the {top} tests with the most compilation time:", head]
    by_compile = sorted(rows, key=lambda r: -r.get("compile_s", 0))[:top]
    out += [line(r["id"], collections.Counter(r)) for r in by_compile]
    return "\n".join(out)


if __name__ == "__main__":
    print(report(sys.argv[1] if len(sys.argv) > 1 else "test_profile"))
