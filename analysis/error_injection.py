"""Claim: a consistency function with L2 error eps_cm gives KL = O(eps_cm^2) after enough steps.

The error-injection study: exact Gaussian laws of the sampler with an affine error of scale eps
injected into the exact flow map, the KL against the injected error eps_cm^2 = max_k E||f - Phi||^2,
and the slope of log KL on log eps_cm^2 over the largest eps (1 when KL = O(eps_cm^2)). Small
default: the study's defaults (one 2-d Gaussian, K = 2 .. 16); ``--full``: Gaussians in d = 2,
8, 32 and K up to 32.

    python analysis/error_injection.py [--full]
"""

import numpy as np
from _claim import run_claim

FULL = dict(
    data={
        f"gaussian_d{d}": {
            "family": "gaussian",
            "mean": [0.5] * d,
            "cov": (0.5 * np.eye(d) + 0.1).tolist(),
        }
        for d in (2, 8, 32)
    },
    steps=(2, 4, 8, 16, 32),
)

if __name__ == "__main__":
    run_claim(__doc__, "error_injection", {}, FULL, "error_injection")
