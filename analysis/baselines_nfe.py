"""Claim: multi-step consistency sampling needs far fewer network evaluations (NFE) than
diffusion samplers for the same accuracy.

The sampling study on Gaussian entries with the exact flow (consistency sampler, NFE = K) and
the four fixed-step diffusion baselines with the exact score (reverse SDE Euler-Maruyama and
exponential integrator, PF-ODE Euler and Heun; NFE = steps, Heun 2 per step), all with exact
Gaussian laws: the NFE to reach KL <= eps^2. Small default: d = 2 and 8, baselines up to 256
steps; ``--full``: d up to 32, baselines up to 1024 steps.

    python analysis/baselines_nfe.py [--full]
"""

from _claim import run_claim, sampling_entries

SMALL = dict(data=sampling_entries("gaussian", (2, 8)), max_steps=12, taus=(0.0, float("inf")))
FULL = SMALL | dict(
    data=sampling_entries("gaussian", (2, 8, 32)),
    max_steps=24,
    baseline_steps=(4, 8, 16, 32, 64, 128, 256, 512, 1024),
)

if __name__ == "__main__":
    run_claim(__doc__, "sampling", SMALL, FULL, "baselines_nfe")
