"""Claim: a consistency function with L2 error eps_cm gives KL = O(eps_cm^2) after enough steps.

A thin call of the registered ``error_injection`` study (`mcm_prob.studies.error_injection`:
exact Gaussian laws of the sampler with an affine error injected into the exact flow map).
Writes the netCDF file and a PNG next to it, and prints the report; the same as

    mcm-prob run error_injection --out error_injection.nc && mcm-prob report error_injection.nc
"""

from __future__ import annotations

import argparse

import jax

jax.config.update("jax_enable_x64", True)

from mcm_prob import studies  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="error_injection.nc")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    tree = studies.run_error_injection(out=args.out, overwrite=args.overwrite, progress=False)
    print(studies.report(tree))
    studies.plot(tree).savefig(args.out.rsplit(".", 1)[0] + ".png", dpi=120)


if __name__ == "__main__":
    main()
