"""Shared command line of the claim scripts: run a registered study with a small default or
the `--full` setting, write FILE.nc, FILE_report.txt and FILE.png, and print the report."""

from __future__ import annotations

import argparse
from pathlib import Path

from mcm_prob.devices import reproducible_gpu_kernels, use_every_cpu_core

use_every_cpu_core()  # as the mcm-prob command: one XLA device per core, before JAX starts
reproducible_gpu_kernels()  # and GPU kernels chosen by fixed rules (reproducible runs)
import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

from mcm_prob import studies  # noqa: E402
from mcm_prob.studies.sampling import default_sampling_data  # noqa: E402


def sampling_entries(family: str, dims) -> dict:
    """The sampling study's default entries of one family (``"gaussian"`` or ``"box"``)."""
    return {k: v for k, v in default_sampling_data(dims).items() if k.startswith(family + "_")}


def steps_settings(family: str) -> tuple[dict, dict]:
    """(small, full) sampling-study settings of the steps-versus-d claims for one family:
    d = 1, 2, 4, 8 and K <= 16, or d = 1 .. 64, K <= 32 and eps down to 0.003; no baselines."""
    small = dict(
        data=sampling_entries(family, (1, 2, 4, 8)),
        max_steps=16,
        baselines=(),
        taus=(0.0, 0.5, float("inf")),
    )
    full = small | dict(
        data=sampling_entries(family, (1, 2, 4, 8, 16, 32, 64)),
        max_steps=32,
        eps=(0.1, 0.03, 0.01, 0.003),
    )
    return small, full


def full_estimation(small: dict, **train) -> dict:
    """The `--full` setting of an estimation-study claim from its small one: 8 seeds, budgets
    2000 and 8000, the larger samples and analysis, and the network/batch keys `train`."""
    return small | {
        "seeds": list(range(8)),
        "budgets": [2000, 8000],
        "eval_samples": 2048,
        "sample_size": 2000,
        "n_boot": 2000,
        "draws": 600,
        "train": small["train"] | train,
    }


def run_claim(doc: str, study: str, small: dict, full: dict, out: str, *, argv=None):
    """Parse ``--full --out FILE --resume --overwrite`` and run `study`; returns (tree, path)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the full setting (see the docstring)")
    parser.add_argument("--out", default=None, help=f"netCDF file (default {out}[_full].nc)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true")
    mode.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    path = Path(args.out or f"{out}{'_full' if args.full else ''}.nc")
    config = studies.get(study).config_type(**(full if args.full else small))
    tree = studies.run(
        study, config, path, resume=args.resume, overwrite=args.overwrite, progress=False
    )
    report = studies.report(tree)
    print(report)
    path.with_name(path.stem + "_report.txt").write_text(report + "\n")
    studies.plot(tree).savefig(path.with_suffix(".png"), dpi=120)
    extra = studies.get(study).figures(tree)  # e.g. image grids of image entries' draws
    for name, fig in extra.items():
        fig.savefig(path.with_name(f"{path.stem}_{name}.png"), dpi=120)
    print(
        f"wrote {path}, {path.stem}_report.txt, {path.stem}.png"
        + "".join(f", {path.stem}_{name}.png" for name in extra)
        + f" (wall time {tree.attrs['wall_time_s']:.1f} s)"
    )
    return tree, path
