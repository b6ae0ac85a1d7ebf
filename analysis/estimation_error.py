"""Claim: consistency functions can be estimated accurately with small discretization steps,
for smooth and non-smooth data.

The estimation study: a grid of (step x seed) consistency-distillation fits per data entry (a
smooth Gaussian mixture and a non-smooth Dirac mixture), the consistency error against the
exact flow, a bootstrap over seeds and three checked Bayesian error models (power law,
discretization + learning, GP), compared by PSIS-LOO; with several training budgets, how the
error at small steps falls with training. Small default: the ``--quick`` settings (about a
minute on 2 CPU cores); ``--full``: the main job (`mcm-prob run estimation`, a few minutes).

    python analysis/estimation_error.py [--full]
"""

from _claim import run_claim

from mcm_prob.studies.estimation import QUICK

if __name__ == "__main__":
    run_claim(__doc__, "estimation", QUICK, {}, "estimation_error")
