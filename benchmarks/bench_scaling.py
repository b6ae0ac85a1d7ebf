"""Strong scaling of `fit_grid` over the local devices: one grid, 1..N devices.

Standard workload of bench_training.py (width 128, depth 3, batch 256, CD-Euler, float32, no
EMA). The grid's model axis is sharded over `jax.local_devices()` (restrict them with
CUDA_VISIBLE_DEVICES, or XLA_FLAGS=--xla_force_host_platform_device_count=N on a CPU); the
run is timed after a compiling call (best of `--repeats`).

    for d in 0 0,1 0,1,2,3; do CUDA_VISIBLE_DEVICES=$d python benchmarks/bench_scaling.py; done

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
    args = parser.parse_args()
    data = mp.data.Gaussian(MEAN, COV)
    steps = np.geomspace(0.05, 0.4, args.models)
    cfg = config(args.iterations)

    def run():
        grid, _ = mp.fit_grid(data, cfg, steps=steps, seeds=[0])
        jax.block_until_ready(grid.models)

    sec = timed(run, args.repeats)
    print(
        json.dumps(
            {
                "devices": mp.devices.describe_devices(),
                "models": args.models,
                "iterations": args.iterations,
                "seconds": round(sec, 3),
                "model_it_per_s": round(args.models * args.iterations / sec, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
