"""Strong scaling of `fit_grid` over the local devices: one grid, 1..N devices.

Standard workload of bench_training.py (width 128, depth 3, batch 256, CD-Euler, float32, no
EMA). The grid's model axis is sharded over `jax.local_devices()` (restrict them with
CUDA_VISIBLE_DEVICES, or XLA_FLAGS=--xla_force_host_platform_device_count=N on a CPU); the
run is timed after a compiling call (best of `--repeats`).

    for d in 0 0,1 0,1,2,3; do CUDA_VISIBLE_DEVICES=$d python benchmarks/bench_scaling.py; done

Several processes (JAX's multi-controller runtime, docs/scaling.md): start N copies with
``--coordinator HOST:PORT --num-processes N --process-id I``; the grid is then sharded over
every process's devices and process 0 prints the line. On one CPU host, e.g. 2 processes of
one device each against 1 process of 2 devices (same total work):

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python benchmarks/bench_scaling.py --models 64
    for i in 0 1; do XLA_FLAGS=--xla_force_host_platform_device_count=1 python \
        benchmarks/bench_scaling.py --models 64 --coordinator localhost:12355 \
        --num-processes 2 --process-id $i & done; wait

Prints one JSON line; efficiency = (rate on N devices) / (N x rate on 1 device), computed in
benchmarks/README.md from these lines.
"""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np
from bench_training import COV, MEAN, config, timed

import mcm_prob as mp


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=1024)
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--coordinator", help="HOST:PORT of process 0 (several processes)")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    args = parser.parse_args()
    if args.num_processes is not None:
        mp.devices.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    data = mp.data.Gaussian(MEAN, COV)
    steps = np.geomspace(0.05, 0.4, args.models)
    cfg = config(args.iterations)

    def run():
        grid, _ = mp.fit_grid(data, cfg, steps=steps, seeds=[0])
        jax.block_until_ready(grid.models)

    sec = timed(run, args.repeats)
    if jax.process_index() > 0:
        return
    print(
        json.dumps(
            {
                "devices": mp.devices.describe_devices(),
                "processes": jax.process_count(),
                "global_devices": jax.device_count(),
                "models": args.models,
                "iterations": args.iterations,
                "seconds": round(sec, 3),
                "model_it_per_s": round(args.models * args.iterations / sec, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
