"""Claim (smooth data): the multi-step sampler reaches KL <= eps^2 in O(log(d/eps)) steps at a
constant step size.

The sampling study on Gaussian entries N(0.5, diag(0.5 .. 2)) in d dimensions, with the exact
flow: exact KL of the sampler law against K, the smallest K with KL <= eps^2, and the fit
steps ~ a + b log(d/eps) per tau (group ``/fits``). Small default: d = 1, 2, 4, 8, K <= 16
(seconds); ``--full``: d = 1 .. 64, K <= 32, eps down to 0.003.

    python analysis/smooth_steps.py [--full]
"""

from _claim import run_claim, steps_settings

SMALL, FULL = steps_settings("gaussian")

if __name__ == "__main__":
    run_claim(__doc__, "sampling", SMALL, FULL, "smooth_steps")
