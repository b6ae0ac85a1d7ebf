"""Claim (non-smooth data, early stopping at delta): O(d log(d/eps)) steps suffice.

The sampling study on uniform boxes [-1, 1]^d stopped at delta = 0.05, with the exact flow:
exact KL of the sampler law (1-d grid laws, summed over the d coordinates) against K, the
smallest K with KL <= eps^2, and the fit steps ~ a + b log(d/eps) (group ``/fits``): a slope b
that does not grow with d says the d log(d/eps) bound is loose for this family. Small default:
d = 1, 2, 4, 8; ``--full``: d = 1 .. 64, K <= 32, eps down to 0.003.

    python analysis/nonsmooth_steps.py [--full]
"""

from _claim import run_claim, steps_settings

SMALL, FULL = steps_settings("box")

if __name__ == "__main__":
    run_claim(__doc__, "sampling", SMALL, FULL, "nonsmooth_steps")
