"""Cost per iteration of every objective: steady-state time and working memory.

Workload: the estimation study's default smooth entry (2-d Gaussian mixture), OU, T = 3.21,
delta = 0.01, the displacement net of width 64 and depth 2 (the study's default size), batch 256,
float32, Adam; discrete objectives at Delta = 0.1. For each objective: `fit_grid` of `--models`
seeds for `--iterations` iterations in chunks of `--chunk`, the steady-state seconds per
iteration and model (`history["seconds_per_iteration"]`: chunks after the first, no
compilation), the first call's wall time (compilation included), and the working memory of
one model's loss-and-gradient step (XLA's `memory_analysis().temp_size_in_bytes` of the
compiled step).

    python benchmarks/bench_objectives.py --models 1 --iterations 2000
    python benchmarks/bench_objectives.py --models 64 --iterations 2000 --json out.json

Prints one line per objective; results are recorded in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import time

import equinox as eqx
import jax
import jax.numpy as jnp

import mcm_prob as mp
from mcm_prob import training
from mcm_prob.studies.estimation import DEFAULT_DATA
from mcm_prob.training.objective import Context

LABELS = list(training.OBJECTIVES)


def settings(iterations: int, chunk: int) -> mp.FitConfig:
    return mp.FitConfig(
        T=3.21,
        delta=0.01,
        iterations=iterations,
        batch_size=256,
        chunk_size=chunk,
        ema_decay=0.0,
        progress=False,
        network=mp.NetworkConfig(form="displacement", width=64, depth=2),
    )


def step_memory(data, objective, cfg: mp.FitConfig) -> int:
    """Temporary bytes of one compiled loss-and-gradient evaluation of one model."""
    net = cfg.network.build(data.dim, cfg.path, jax.random.key(0))
    params, static = eqx.partition(net, eqx.is_inexact_array)
    step = 0.1 if objective.has_step else 0.0

    def loss(p, key):
        ctx = Context(data, cfg.path, cfg.T, cfg.delta, jnp.asarray(step), jnp.asarray(0), 256)
        model = eqx.combine(p, static)
        target = eqx.combine(jax.lax.stop_gradient(p), static)
        return jnp.mean(objective.loss(model, target, key, ctx))

    compiled = jax.jit(jax.value_and_grad(loss)).lower(params, jax.random.key(1)).compile()
    analysis = compiled.memory_analysis()
    return int(analysis.temp_size_in_bytes) if analysis is not None else -1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--chunk", type=int, default=500)
    parser.add_argument("--objectives", nargs="*", default=LABELS)
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()
    data = mp.data.from_spec(DEFAULT_DATA["smooth"])
    cfg = settings(args.iterations, args.chunk)
    print(f"backend {jax.default_backend()}, jax {jax.__version__}, {args.models} model(s)")
    rows = []
    for label in args.objectives:
        _, obj = training.objective_from_spec(label)
        start = time.perf_counter()
        _, hist = mp.fit_grid(
            data,
            obj,
            steps=[0.1] if obj.has_step else None,
            seeds=list(range(args.models)),
            settings=cfg,
        )
        wall = time.perf_counter() - start
        row = {
            "objective": label,
            "us_per_iteration_and_model": 1e6 * hist["seconds_per_iteration"],
            "model_iterations_per_s": 1.0 / hist["seconds_per_iteration"],
            "first_call_s": wall,
            "step_temp_MiB": step_memory(data, obj, cfg) / 2**20,
        }
        rows.append(row)
        print(
            f"{label:18s} {row['us_per_iteration_and_model']:9.2f} us/it/model "
            f"{row['model_iterations_per_s']:12.0f} model-it/s  first call {wall:6.1f} s  "
            f"step memory {row['step_temp_MiB']:7.2f} MiB",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"backend": jax.default_backend(), "models": args.models, "rows": rows}, fh)


if __name__ == "__main__":
    main()
