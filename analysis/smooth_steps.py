"""Claim (smooth data): the multi-step sampler reaches KL <= eps^2 in O(log(d/eps)) steps at a
constant step size.

The sampling study on Gaussian entries N(0.5, diag(0.5 .. 2)) in d dimensions, with the exact
flow: exact KL of the sampler law against K, the smallest K with KL <= eps^2, and the fit
steps ~ a + b log(d/eps) per tau (group ``/fits``). Small default: d = 1, 2, 4, 8, K <= 16
(seconds); ``--full``: d = 1 .. 64, K <= 32, eps down to 0.003.

    python analysis/smooth_steps.py [--full]
"""

from _claim import run_claim

from mcm_prob.studies.sampling import default_sampling_data


def gaussians(dims):
    return {k: v for k, v in default_sampling_data(dims).items() if k.startswith("gaussian")}


SMALL = dict(
    data=gaussians((1, 2, 4, 8)), max_steps=16, baselines=(), taus=(0.0, 0.5, float("inf"))
)
FULL = SMALL | dict(
    data=gaussians((1, 2, 4, 8, 16, 32, 64)), max_steps=32, eps=(0.1, 0.03, 0.01, 0.003)
)

if __name__ == "__main__":
    tree, _ = run_claim(__doc__, "sampling", SMALL, FULL, "smooth_steps")
    fits = tree["fits"].to_dataset().sel(regime="smooth")
    for tau in fits["tau"].values:
        f = fits.sel(tau=tau)
        print(
            f"tau = {tau}: steps ~ {float(f['a']):.2f} + {float(f['b']):.2f} log(d/eps) "
            f"over {int(f['cells'])} cells"
        )
