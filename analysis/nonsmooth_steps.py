"""Claim (non-smooth data, early stopping at delta): O(d log(d/eps)) steps suffice.

The sampling study on uniform boxes [-1, 1]^d stopped at delta = 0.05, with the exact flow:
exact KL of the sampler law (1-d grid laws, summed over the d coordinates) against K, the
smallest K with KL <= eps^2, and the fit steps ~ a + b log(d/eps) (group ``/fits``): a slope b
that does not grow with d says the d log(d/eps) bound is loose for this family. Small default:
d = 1, 2, 4, 8; ``--full``: d = 1 .. 64, K <= 32, eps down to 0.003.

    python analysis/nonsmooth_steps.py [--full]
"""

from _claim import run_claim

from mcm_prob.studies.sampling import default_sampling_data


def boxes(dims):
    return {k: v for k, v in default_sampling_data(dims).items() if k.startswith("box")}


SMALL = dict(data=boxes((1, 2, 4, 8)), max_steps=16, baselines=(), taus=(0.0, 0.5, float("inf")))
FULL = SMALL | dict(
    data=boxes((1, 2, 4, 8, 16, 32, 64)), max_steps=32, eps=(0.1, 0.03, 0.01, 0.003)
)

if __name__ == "__main__":
    tree, _ = run_claim(__doc__, "sampling", SMALL, FULL, "nonsmooth_steps")
    fits = tree["fits"].to_dataset().sel(regime="nonsmooth")
    for tau in fits["tau"].values:
        f = fits.sel(tau=tau)
        print(
            f"tau = {tau}: steps ~ {float(f['a']):.2f} + {float(f['b']):.2f} log(d/eps) "
            f"over {int(f['cells'])} cells"
        )
