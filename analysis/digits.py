"""Claims on real data: the digits (scikit-learn's 8x8 images, d = 64) with exact ground truth.

1. The smooth claim at d = 64 with a real spectrum: how many steps does the multi-step sampler
   with the exact flow need to reach KL <= eps^2 on the digits' fitted Gaussian (eigenvalues
   from 2.8 down to the 1e-4 floor), under every Gaussian path (OU, VP, VE, the linear
   interpolant, TrigFlow)? The sampling study, exact KL, constant step h per path (in that
   path's time units), tau = 0 and inf.
2. Learned samplers on the empirical measure: how does each objective (CD, sCT, MeanFlow)
   trade sample quality (energy distance to exact draws of p_delta) against memorisation
   (`mcm_prob.metrics.memorisation`: 1 new images, 0 copies of training images) as the number
   of steps K grows? The estimation study with both digits entries, K = 1, 2, 4, 8, beside
   the exact-flow sampler (whose draws are training images plus p_delta's noise); the
   report's quality-against-memorisation table and the image grids
   (digits_objectives_images_*.png).

Small default: a few minutes on 2 CPU cores; ``--full``: larger nets, budgets and 8 seeds (a GPU).

    python analysis/digits.py [--full]
"""

import sys
import tomllib
from pathlib import Path

from _claim import full_estimation, run_claim

_TOML = tomllib.loads((Path(__file__).parent / "digits.toml").read_text())
GAUSS = _TOML["sampling"]["data"]["digits_gauss"]
DELTA = 0.001
# per path: (h, max_steps, T): the constant step in the path's own time units, within its range
PATHS = {
    "ou": (0.5, 16, 8.0),
    "vp": (0.06, 16, 1.0),
    "ve": (5.0, 16, 80.0),
    "linear": (0.06, 16, 1.0),
    "trigflow": (0.095, 16, 1.5),
}
EPS = (0.1, 0.03, 0.01)


def steps_config(path: str, h: float, max_steps: int, T: float, *, full: bool) -> dict:
    return dict(
        path=path,
        data={"digits_gauss": GAUSS},
        h=h,
        max_steps=max_steps,
        T=T,
        taus=(0.0, float("inf")),
        baselines=(),
        eps=EPS + ((0.003,) if full else ()),
        delta_smooth=DELTA,
        delta_nonsmooth=DELTA,
    )


SMALL = _TOML["estimation"] | {"sampler_ks": [1, 2, 4, 8]}
FULL = full_estimation(SMALL, width=256, depth=3, batch_size=256)


def steps(argv) -> None:
    """Part 1: steps to KL <= eps^2 on the fitted Gaussian under every path."""
    for name, (h, k, T) in PATHS.items():
        small, full = (steps_config(name, h, k, T, full=f) for f in (False, True))
        run_claim(__doc__, "sampling", small, full, f"digits_steps_{name}", argv=argv)


def objectives(argv) -> None:
    """Part 2: the objectives' quality against memorisation on the empirical measure."""
    run_claim(__doc__, "estimation", SMALL, FULL, "digits_objectives", argv=argv)


if __name__ == "__main__":
    steps(sys.argv[1:])
    objectives(sys.argv[1:])
