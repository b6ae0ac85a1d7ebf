"""Claim (Align Your Flow, and the objectives' own papers): flow-map objectives learn two-time maps
as well as consistency models, and consistency-trained samplers degrade as the number of
steps grows while flow maps do not.

The estimation study over objectives (`analysis/objectives.toml`): CD, CT, continuous-time
consistency (sCT), MeanFlow, shortcut, Lagrangian flow map distillation and progressive
self-distillation, with the same network, batch and iterations, on a smooth and a non-smooth
1-d entry, under two paths (OU and the linear interpolant): consistency error against the
exact flow per budget, the exact KL of the K-step sampler's law (1-d grid law) at K = 1, 2, 4,
cost per iteration, and the checked error models of the discrete methods. Small default
(several minutes per path on 2 CPU cores); ``--full``: larger budgets, nets and 8 seeds (a GPU).

    python analysis/objectives.py [--full]
"""

import sys
import tomllib
from pathlib import Path

from _claim import full_estimation, run_claim

_TOML = tomllib.loads((Path(__file__).parent / "objectives.toml").read_text())["estimation"]
SMALL = _TOML
FULL = full_estimation(_TOML, width=128, depth=3, batch_size=256)
# the linear interpolant lives on [0, 1]: steps such that delta + 8 x the largest <= 1
PATHS = {"ou": {}, "linear": {"path": "linear", "steps": [0.025, 0.05, 0.1]}}

if __name__ == "__main__":
    for name, extra in PATHS.items():
        small, full = SMALL | extra, FULL | extra
        run_claim(__doc__, "estimation", small, full, f"objectives_{name}", argv=sys.argv[1:])
