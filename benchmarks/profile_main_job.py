"""Where the main job's time goes: the estimation study with a timer per phase.

Runs `mcm-prob run estimation` (the default main job, or `--quick`) in this process with the
study's building blocks wrapped in timers, then prints one JSON line: total wall time, the time
per phase (training, reference flows, teacher maps, consistency errors, sampler checks, grid
laws, bootstrap, Bayesian error models, saving) and what is left (compilation outside the
wrapped calls, xarray bookkeeping, start-up), and the XLA compilations (count and seconds;
persistent-cache hits are counted too, they are fast) and tracing seconds per phase
(`jax.monitoring` duration events). Phases are exclusive: a wrapped call inside
another is counted once, in the innermost phase. JAX work is synchronised (results are pulled
to the host) at the end of every wrapped call, so asynchronous dispatch does not move time
between phases.

    python benchmarks/profile_main_job.py                    # default main job
    python benchmarks/profile_main_job.py --quick
    MCM_PROB_COMPILATION_CACHE=off python benchmarks/profile_main_job.py   # no cache

The compilation cache is used as the study uses it (`mcm_prob.cache`); point XDG_CACHE_HOME
at an empty directory for a cold-cache figure.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import tempfile
import time
from pathlib import Path

from mcm_prob.devices import reproducible_gpu_kernels, use_every_cpu_core

use_every_cpu_core()  # as the mcm-prob command does
reproducible_gpu_kernels()
import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import mcm_prob as mp  # noqa: E402
from mcm_prob.studies import driver, estimation  # noqa: E402

_TIMES: collections.Counter = collections.Counter()
_STACK: list[str] = []
# XLA compilations (backend compiles, persistent-cache hits included) and tracing, per phase
_COMPILES: collections.Counter = collections.Counter()
_COMPILE_S: collections.Counter = collections.Counter()
_TRACE_S: collections.Counter = collections.Counter()
_EVENTS = {
    "/jax/core/compile/backend_compile_duration": (_COMPILES, _COMPILE_S),
    "/jax/core/compile/jaxpr_trace_duration": (None, _TRACE_S),
}


def _on_duration(event: str, seconds: float, **_) -> None:
    if event in _EVENTS:
        count, total = _EVENTS[event]
        phase = _STACK[-1] if _STACK else "other"
        if count is not None:
            count[phase] += 1
        total[phase] += seconds


jax.monitoring.register_event_duration_secs_listener(_on_duration)


def _timed(phase: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        _STACK.append(phase)
        try:
            out = jax.block_until_ready(fn(*args, **kwargs))
        finally:
            _STACK.pop()
            spent = time.perf_counter() - start
            _TIMES[phase] += spent
            if _STACK:  # exclusive times: the enclosing phase does not count this call
                _TIMES[_STACK[-1]] -= spent
        return out

    return wrapper


# (module, attribute, phase): the study looks these names up at call time
_PHASES = [
    (estimation, "fit_grid", "train (fit_grid)"),
    (estimation.metrics, "reference_flows", "reference flows (exact, float64)"),
    (estimation, "teacher_map", "teacher maps"),
    (estimation.metrics, "consistency_error", "consistency errors"),
    (estimation, "_sample_quality", "sampler checks (sample, k-NN KL, energy)"),
    (estimation, "sample_grid", "sampler checks (sample, k-NN KL, energy)"),
    (estimation, "_quality", "sampler checks (sample, k-NN KL, energy)"),
    (estimation, "_grid_kl", "grid laws (1-d entries)"),
    (estimation, "bootstrap_rates", "bootstrap"),
    (estimation, "fit_error_models", "error models (NUTS + checks)"),
    (estimation, "compare_error_models", "LOO comparison"),
    (driver, "save_tree", "saving netCDF"),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--config", default=None, help="TOML config, as for mcm-prob run")
    parser.add_argument("--out", default=None, help="keep the result file here")
    args = parser.parse_args()
    for module, name, phase in _PHASES:
        setattr(module, name, _timed(phase, getattr(module, name)))
    study = mp.studies.STUDIES["estimation"]
    cfg = driver.load_config(args.config, study, quick=args.quick)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        out = Path(args.out or Path(tmp) / "main.nc")
        tree = driver.run_study(study, cfg, out, progress=False)
        total = time.perf_counter() - start
    phases = {k: round(v, 2) for k, v in _TIMES.most_common()}
    compiles = {k: _COMPILES[k] for k in [*phases, "other"] if _COMPILES[k]}
    print(
        json.dumps(
            {
                "device": str(jax.devices()[0]),
                "devices": tree.attrs.get("devices"),
                "jax": jax.__version__,
                "quick": args.quick,
                "wall_s": round(total, 2),
                "phases_s": phases,
                "other_s": round(total - sum(_TIMES.values()), 2),
                "xla_compilations": sum(_COMPILES.values()),
                "xla_compilations_per_phase": compiles,
                "xla_compile_s_per_phase": {k: round(v, 2) for k, v in _COMPILE_S.items()},
                "tracing_s_per_phase": {k: round(v, 2) for k, v in _TRACE_S.items()},
                "compilation_cache": tree.attrs.get("compilation_cache"),
            }
        )
    )


if __name__ == "__main__":
    main()
