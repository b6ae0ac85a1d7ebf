"""Where the error models' time goes, and on which device they run fastest.

Fits each error model of `mcm_prob.error_models` to a synthetic error array of the main job's
shape (3 entries x 3 budgets x 5 steps x 8 seeds, a power law with noise) with the main job's
NUTS settings, on each device kind given, and prints one JSON line per (model, device):
tracing and compilation (`_lower`), the run (warm-up and draws) and a continuation of every
chain by as many draws again (what a refit costs).

    python benchmarks/bench_error_models.py                 # CPU only
    python benchmarks/bench_error_models.py --devices cpu gpu
    python benchmarks/bench_error_models.py --together --entries 2   # as the main job calls them

`--together` times `fit_error_models` of the three models at once instead (traced, compiled
and run as the study does, one refit allowed, on this process's CPU devices) and prints one
line: the seconds and each model's refit count.
"""

from __future__ import annotations

import argparse
import json
import time

from mcm_prob.devices import use_every_cpu_core

use_every_cpu_core()  # as the mcm-prob command does: the models spread over the CPU devices
import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402

from mcm_prob import error_models as em  # noqa: E402
from mcm_prob.cache import enable_compilation_cache  # noqa: E402


def synthetic_errors(entries: int = 3, budgets: int = 3, seed: int = 0) -> xr.DataArray:
    """err = c * step^0.8 * exp(noise) on the main job's grid."""
    rng = np.random.default_rng(seed)
    steps = np.array([0.02, 0.04, 0.08, 0.16, 0.32])
    base = 0.5 * steps**0.8
    vals = base[None, None, :, None] * np.exp(0.1 * rng.standard_normal((entries, budgets, 5, 8)))
    return xr.DataArray(
        vals,
        dims=("entry", "budget", "step", "seed"),
        coords={
            "entry": [f"e{i}" for i in range(entries)],
            "budget": [1500, 3000, 6000][:budgets],
            "step": steps,
            "seed": np.arange(8),
        },
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", nargs="+", default=["cpu"])
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--draws", type=int, default=600)
    parser.add_argument("--entries", type=int, default=3)
    parser.add_argument("--together", action="store_true")
    args = parser.parse_args()
    enable_compilation_cache()  # as the study does
    errors = synthetic_errors(entries=args.entries)
    if args.together:
        kw = dict(chains=args.chains, warmup=args.warmup, draws=args.draws, seed=0)
        t0 = time.perf_counter()
        fits = em.fit_error_models(errors, refits=1, **kw)
        seconds = round(time.perf_counter() - t0, 2)
        refits = {m: int(fit.attrs["refits"]) for m, fit in fits.items()}
        print(json.dumps({"fit_error_models_s": seconds, "refits": refits}), flush=True)
        return
    options = em._options(chains=args.chains, warmup=args.warmup, draws=args.draws, seed=0)
    for kind in args.devices:
        device = jax.devices(kind)[0]
        for model in em.ERROR_MODELS:
            t0 = time.perf_counter()
            run = em._lower(errors, model, options, device)  # trace, compile, start the chains
            t1 = time.perf_counter()
            run.draws()
            t2 = time.perf_counter()
            run.more()  # the chains continued by as many draws again (a refit)
            t3 = time.perf_counter()
            print(
                json.dumps(
                    {
                        "model": model,
                        "device": str(device),
                        "trace_compile_s": round(t1 - t0, 2),
                        "run_s": round(t2 - t1, 2),
                        "continue_s": round(t3 - t2, 2),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
