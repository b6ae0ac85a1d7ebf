"""The multi-GPU runs (strong and weak scaling of `fit_grid`, a study over several processes)
in few device calls, single- and multi-controller side by side.

    python benchmarks/scaling_runs.py strong --models 1024 4096 --devices 1 2 4 8
    python benchmarks/scaling_runs.py weak --per-device 256 --devices 1 2 4 8
    python benchmarks/scaling_runs.py study --devices 4 --out DIR       # the default main job

Every `fit_grid` figure is one run of `bench_scaling.py` (its workload, timed after a
compiling call): **single-controller** = one process seeing the first N GPUs
(``CUDA_VISIBLE_DEVICES=0,...,N-1``), **multi-controller** = N processes of one GPU each,
joined by `jax.distributed` on localhost (docs/scaling.md). One JSON line per run: the
model-iterations per second and the efficiency = rate / (N x the one-GPU rate of the same
grid; for weak scaling, of the per-device grid). `study`: `mcm-prob run estimation [--config
FILE]` (default: the main job) on one GPU ("one"), on N GPUs in one process ("single") and
as N processes of one GPU each ("multi"); prints each run's wall times (cells, analysis) and
compares the files (timings aside): single and multi use the same devices, so every group
must be allclose; one GPU trains with other round-off (a grid split over other devices), so
against it the results, bootstrap and observed data must be allclose, and the error models'
posterior means are given as the largest difference in combined Monte Carlo standard errors
(NUTS turns round-off in its data into other draws).

``--cpu`` runs the same on XLA host devices (``--xla_force_host_platform_device_count``)
instead of GPUs: a check of this driver on a machine without GPUs, not a scaling figure.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = str(ROOT / "benchmarks" / "bench_scaling.py")


def _env(devices: int, index: int | None, cpu: bool) -> dict:
    """The environment of one process: all `devices` (index None) or device `index` alone."""
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")])}
    if cpu:
        count = devices if index is None else 1
        return env | {
            "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={count}",
        }
    visible = ",".join(map(str, range(devices))) if index is None else str(index)
    return env | {"CUDA_VISIBLE_DEVICES": visible}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(argv: list, devices: int, multi: bool, cpu: bool, timeout: float) -> str:
    """Run ``python argv`` as one process over `devices` devices, or (`multi`) as `devices`
    processes of one device each; returns process 0's standard output, raises with the
    failing process's standard error."""
    if not multi:
        runs = [(argv, _env(devices, None, cpu))]
    else:
        port = _port()
        join = ["--coordinator", f"localhost:{port}", "--num-processes", str(devices)]
        runs = [
            (argv + join + ["--process-id", str(i)], _env(devices, i, cpu)) for i in range(devices)
        ]
    procs = [
        subprocess.Popen([sys.executable, *a], env=e, cwd=ROOT, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for a, e in runs
    ]  # fmt: skip
    outs = [p.communicate(timeout=timeout) for p in procs]
    for i, (p, (_, err)) in enumerate(zip(procs, outs, strict=True)):
        if p.returncode != 0:
            raise RuntimeError(f"process {i} of {argv} exited with {p.returncode}:\n{err[-3000:]}")
    return outs[0][0]


def _rate(models: int, iterations: int, devices: int, multi: bool, args) -> dict:
    argv = [BENCH, "--models", str(models), "--iterations", str(iterations)]
    out = launch(argv, devices, multi, args.cpu, args.timeout)
    row = json.loads(out.strip().splitlines()[-1])
    return row | {"controllers": "multi" if multi else "single", "device_count": devices}


def scaling(args, grid) -> None:
    """`grid(n)`: the model counts at n devices. The efficiency's reference is the one-device
    single-controller rate of the same grid (strong) or of the one-device grid (weak)."""
    one = {}  # models -> the one-device single-controller row

    def reference(models: int) -> dict:
        if models not in one:
            one[models] = _rate(models, args.iterations, 1, False, args)
        return one[models]

    for n in args.devices:
        for models in grid(n):
            base = reference(models if args.mode == "strong" else grid(1)[0])
            for multi in (False, True) if n > 1 else (False,):
                row = base if n == 1 else _rate(models, args.iterations, n, multi, args)
                row = row | {
                    "efficiency": round(row["model_it_per_s"] / (n * base["model_it_per_s"]), 3)
                }
                print(json.dumps(row | {"mode": args.mode}), flush=True)


# groups drawn by NUTS: their numbers move with the round-off of the errors they are fitted to
_DRAWN = ("posterior", "posterior_predictive", "log_likelihood", "sample_stats", "checks",
          "curve", "loo_pit")  # fmt: skip


def _compare(want, got, deterministic_only: bool) -> dict:
    """assert_allclose of every group of two study files (timings aside); with
    `deterministic_only`, only the groups not drawn by NUTS (results, bootstrap, observed
    data, ...), and for each error model the largest |difference of posterior means| in
    combined Monte Carlo standard errors."""
    import numpy as np
    import xarray as xr
    from arviz_stats import mcse

    z = {}
    for node in want.subtree:
        drawn = node.name in _DRAWN or node.path == "/summary"
        if deterministic_only and drawn:
            continue
        a = node.to_dataset(inherit=False)
        timings = [v for v in a.data_vars if "wall_time" in v or "seconds" in v]
        b = got[node.path].to_dataset(inherit=False)
        xr.testing.assert_allclose(b.drop_vars(timings), a.drop_vars(timings))
    if deterministic_only:
        for name in want["error_models"].children:
            post = [t["error_models"][name]["posterior"].to_dataset() for t in (want, got)]
            se = [mcse(p, sample_dims=["chain", "draw"]) for p in post]
            worst = 0.0
            for v in post[0].data_vars:
                diff = abs(post[0][v].mean(["chain", "draw"]) - post[1][v].mean(["chain", "draw"]))
                worst = max(worst, float(np.max(diff / np.hypot(se[0][v], se[1][v]))))
            z[name] = round(worst, 2)
    return z


def study(args) -> None:
    """One GPU, N GPUs in one process, N processes of one GPU each (`args.runs`)."""
    from mcm_prob.results import load_tree

    n, out = args.devices[-1], Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shapes = {"one": (1, False), "single": (n, False), "multi": (n, True)}
    files = {}
    for run in args.runs:
        devices, multi = shapes[run]
        path = out / f"study_{run}.nc"
        argv = ["-m", "mcm_prob.cli", "run", "estimation", "--out", str(path), "--overwrite",
                "--no-progress"] + (["--config", args.config] if args.config else [])  # fmt: skip
        start = time.perf_counter()
        launch(argv + (["--distributed"] if multi else []), devices, multi, args.cpu, args.timeout)
        tree = files[run] = load_tree(path)
        cells = float(tree["results"].to_dataset()["cell_wall_time"].sum())
        wall = float(tree.attrs["wall_time_s"])
        print(json.dumps({
            "study": args.config or "main job", "run": run, "processes": int(tree.attrs["process_count"]),
            "devices": int(tree.attrs["device_count"]), "wall_s": round(time.perf_counter() - start, 1),
            "file_wall_time_s": round(wall, 1), "cells_s": round(cells, 1),
            "analysis_s": round(wall - cells, 1),
        }), flush=True)  # fmt: skip
    for run in shapes:  # files of earlier calls (runs split over device calls) compare too
        if run not in files and (out / f"study_{run}.nc").exists():
            files[run] = load_tree(out / f"study_{run}.nc")
    if "single" in files and "multi" in files:  # the same devices: the same numbers
        _compare(files["single"], files["multi"], deterministic_only=False)
        print(json.dumps({"compared": "single vs multi", "every_group_allclose": True}))
    for run in ("single", "multi"):
        if "one" in files and run in files:
            z = _compare(files["one"], files[run], deterministic_only=True)
            print(json.dumps({"compared": f"one vs {run}", "results_allclose": True,
                              "posterior_mean_max_z": z}))  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["strong", "weak", "study"])
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--models", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--per-device", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--config", default=None, help="study: TOML (default: the main job)")
    parser.add_argument("--out", default="scaling_runs")
    parser.add_argument("--runs", nargs="+", choices=["one", "single", "multi"],
                        default=["one", "single", "multi"], help="study: which runs")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=550.0, help="seconds per process")
    parser.add_argument("--cpu", action="store_true", help="host CPU devices (a driver check)")
    args = parser.parse_args(argv)
    if args.mode == "study":
        study(args)
    elif args.mode == "strong":
        scaling(args, lambda n: args.models)
    else:
        scaling(args, lambda n: [args.per_device * n])


if __name__ == "__main__":
    main()
