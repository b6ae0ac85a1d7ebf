"""Exact Gaussian laws at image scale: d = 3072 given by eigenvalues, K = 1000 steps, under VP.

Times (best of 5 after one warm-up call) of `sampler_law` (exact-flow sampler, constant step
from T = 1), `baseline_law` for the four fixed-step schemes, and `kl_gaussian` against p_delta,
all per eigenvalue in O(K d). Prints one JSON line. Usage: python benchmarks/bench_eigen_laws.py
"""

import json
import time

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402

import mcm_prob as mp  # noqa: E402
from mcm_prob import paths  # noqa: E402


def best(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    d, k, delta = 3072, 1000, 1e-3
    rng = np.random.default_rng(0)
    data = mp.data.Gaussian(eigvals=np.sort(rng.gamma(0.5, 2.0, d))[::-1] + 1e-4)
    vp = paths.VP()
    target = data.marginal(delta, vp)
    sched = mp.Schedule.fixed_horizon(T=1.0, delta=delta, steps=k, tau=0.01)
    out = {"d": d, "K": k, "path": "vp"}
    out["sampler_law_s"] = best(lambda: mp.sampler_law(data, schedule=sched, path=vp))
    for method in ("sde_euler_maruyama", "sde_exponential", "ode_euler", "ode_heun"):
        out[f"baseline_law_{method}_s"] = best(
            lambda m=method: mp.diffusion.baseline_law(
                data, m, T=1.0, delta=delta, steps=k, path=vp
            )
        )
    law = mp.sampler_law(data, schedule=sched, path=vp)
    out["kl_gaussian_s"] = best(lambda: mp.metrics.kl_gaussian(law, target))
    out["w2_gaussian_s"] = best(lambda: mp.metrics.w2_gaussian(law, target))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
