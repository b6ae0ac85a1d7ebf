"""The `mcm-prob` command line: run studies, report on their files, show provenance.

    mcm-prob run estimation|sampling [--config FILE.toml] [--quick] --out FILE.nc [--resume | --overwrite]
    mcm-prob report FILE.nc      # summary table on stdout, PNG plots next to the file
    mcm-prob info FILE.nc        # provenance

Ground truth runs in float64 (the command enables JAX's x64 mode for its own process);
networks train in float32, as the files' `dtype` attribute says.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np


def _enable_x64() -> None:
    import jax

    jax.config.update("jax_enable_x64", True)


def _run(args) -> int:
    from . import studies

    try:
        config = studies.load_config(args.config, args.study, quick=args.quick)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"mcm-prob: bad config: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.exists() and not (args.resume or args.overwrite):
        print(
            f"mcm-prob: {out} exists. Pass --resume to continue it (same config) or --overwrite to replace it.",
            file=sys.stderr,
        )
        return 1
    _enable_x64()
    runner = studies.run_estimation if args.study == "estimation" else studies.run_sampling
    try:
        tree = runner(
            config, out, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"mcm-prob: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            f"\nmcm-prob: interrupted; finished cells are saved in {out}. Continue with the same "
            "command plus --resume.",
            file=sys.stderr,
        )
        return 130
    print(
        f"wrote {out} ({tree.attrs.get('status')}, wall time {tree.attrs.get('wall_time_s', float('nan')):.1f} s)"
    )
    return 0


def _fmt(x: float, digits: int = 3) -> str:
    return "nan" if x is None or not math.isfinite(x) else f"{x:.{digits}g}"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: Path, suffix: str) -> Path:
    """Save `fig` as a PNG next to the results file (name: stem + suffix) and close it."""
    png = path.with_name(path.stem + suffix)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    _pyplot().close(fig)
    return png


def _report_estimation(tree, path: Path) -> list[str]:
    plt = _pyplot()
    res = tree["results"].to_dataset()
    lines = []
    if "bootstrap" not in tree.children:
        lines.append("study is partial: no rate analysis yet (resume it to finish)")
    else:
        boot = tree["bootstrap"].to_dataset()
        diag = tree["posterior/diagnostics"].to_dataset()
        ci = boot.attrs["ci"]
        lines.append(f"rate alpha in consistency error ~ C step^alpha ({ci:.0%} intervals)")
        lines.append(
            f"{'regime':<10} {'alpha':>7} {'bootstrap CI':>18} {'post. mean':>10} {'HDI':>18} {'r_hat':>7} {'ESS':>7}"
        )
        for g in boot["regime"].values:
            b, d = boot.sel(regime=g), diag.sel(regime=g)
            lines.append(
                f"{g:<10} {_fmt(float(b['alpha'])):>7} [{_fmt(float(b['alpha_low'])):>7}, {_fmt(float(b['alpha_high'])):>7}] "
                f"{_fmt(float(d['alpha_mean'])):>10} [{_fmt(float(d['alpha_hdi_low'])):>7}, {_fmt(float(d['alpha_hdi_high'])):>7}] "
                f"{float(d['r_hat']):>7.4f} {float(d['ess_bulk']):>7.0f}"
            )
        refused = json.loads(diag.attrs.get("refused", "{}"))
        for g, why in refused.items():
            lines.append(f"  posterior rate for {g} not reported: {why}")
        if "p_alpha_first_gt_second" in diag.attrs:
            lines.append(
                f"P(alpha {diag.attrs['p_alpha_first_gt_second_regimes']}) = {diag.attrs['p_alpha_first_gt_second']:.3f}"
            )
        lines.append(
            f"bootstrap: {boot.attrs['method']}; posterior: {diag.attrs['sampler']}, {diag.attrs['divergences']} divergences"
        )
    lines.append("")
    lines.append(
        f"{'regime':<10} {'step':>6} {'consist.':>9} {'teacher':>9} {'learning':>9} {'KL est.':>9} {'failed':>6}"
    )
    for g in res["regime"].values:
        r = res.sel(regime=g)
        for st in res["step"].values:
            c = r.sel(step=st)
            lines.append(
                f"{g:<10} {st:>6g} {_fmt(float(c['consistency_error_mean'].mean())):>9} {_fmt(float(c['teacher_error_mean'])):>9} "
                f"{_fmt(float(c['learning_error_mean'].mean())):>9} {_fmt(float(c['kl_estimate'].mean())):>9} {int(c['failed'].sum()):>6}"
            )
        lines.append(
            f"{g:<10} exact-flow sampler KL estimate (estimator floor): {_fmt(float(r['kl_estimate_exact_flow']))} +- {_fmt(float(r['kl_stderr_exact_flow']), 2)}"
        )
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for g in res["regime"].values:
        r = res.sel(regime=g)
        steps = res["step"].values
        line = axes[0].loglog(
            steps, r["consistency_error_mean"].mean("seed"), "o-", label=f"{g}: learned"
        )[0]
        if "bootstrap" in tree.children:
            b = tree["bootstrap"].to_dataset().sel(regime=g)
            axes[0].fill_between(
                steps, b["mean_error_low"], b["mean_error_high"], color=line.get_color(), alpha=0.25
            )
        axes[0].loglog(
            steps, r["teacher_error_mean"], "--", color=line.get_color(), label=f"{g}: teacher only"
        )
        axes[1].semilogx(
            steps, r["kl_estimate"].mean("seed"), "o-", color=line.get_color(), label=g
        )
    axes[0].set(
        xlabel="discretization step Delta",
        ylabel="consistency error",
        title="error vs Delta (band: bootstrap CI)",
    )
    axes[1].set(
        xlabel="discretization step Delta",
        ylabel="KL estimate (nats)",
        title="multi-step sampler quality",
    )
    for ax in axes:
        ax.set_xticks(res["step"].values, [f"{v:g}" for v in res["step"].values])
        ax.minorticks_off()
        ax.legend(fontsize=8)
    lines.append(f"plot: {_save_figure(fig, path, '_error_vs_step.png')}")
    return lines


def _report_sampling(tree, path: Path) -> list[str]:
    plt = _pyplot()
    res = tree["results"].to_dataset()
    lines = [
        "steps to reach KL <= eps^2 (multi-step sampler, exact flow; '-' = more than max_steps)"
    ]
    eps = res["eps"].values
    lines.append(
        f"{'regime':<10} {'dim':>4} {'tau':>6} "
        + " ".join(f"{'eps=' + format(e, 'g'):>9}" for e in eps)
    )
    for g in res["regime"].values:
        for d in res["dim"].values:
            for tau in res["tau"].values:
                row = res["steps_to_eps"].sel(regime=g, dim=d, tau=tau).values
                lines.append(
                    f"{g:<10} {d:>4} {tau:>6g} "
                    + " ".join(f"{('-' if np.isnan(v) else int(v)):>9}" for v in row)
                )
    lines.append("fit steps ~ a + b log(d / eps) over the table (smooth-data claim: O(log(d/eps)))")
    for g in res["regime"].values:
        for tau in res["tau"].values:
            k = res["steps_to_eps"].sel(regime=g, tau=tau)
            x = np.log(k["dim"].values[:, None] / k["eps"].values[None, :]).ravel()
            y = k.values.ravel()
            ok = np.isfinite(y)
            if ok.sum() >= 3 and np.ptp(x[ok]) > 0:
                b, a = np.polyfit(x[ok], y[ok], 1)
                lines.append(f"{g:<10} tau={tau:<6g} b = {b:.2f}, a = {a:.2f} ({ok.sum()} cells)")
    lines.append(
        "NFE to reach KL <= eps^2, diffusion baselines with the exact score (Gaussian data)"
    )
    for m in res["baseline"].values:
        for d in res["dim"].values:
            row = res["nfe_to_eps_baseline"].sel(baseline=m, dim=d).values
            lines.append(
                f"{m:<20} {d:>4} " + " ".join(f"{('-' if np.isnan(v) else int(v)):>9}" for v in row)
            )
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, g in zip(axes, res["regime"].values, strict=True):
        for d in res["dim"].values:
            for tau in res["tau"].values:
                ax.semilogy(
                    res["steps"],
                    res["kl"].sel(regime=g, dim=d, tau=tau),
                    marker=".",
                    label=f"d={d}, tau={tau:g}",
                )
        ax.set(
            xlabel="steps K",
            ylabel="KL(law || p_delta)",
            title=f"{g}: multi-step sampler, exact flow",
        )
        ax.legend(fontsize=6)
    lines.append(f"plot: {_save_figure(fig, path, '_kl_vs_steps.png')}")
    return lines


def _report(args) -> int:
    from .results import load_tree

    path = Path(args.file)
    try:
        tree = load_tree(path)
    except (FileNotFoundError, OSError, ValueError) as err:
        print(f"mcm-prob: cannot read {path}: {err}", file=sys.stderr)
        return 1
    study = tree.attrs.get("study")
    print(
        f"{path}: {study} study, {tree.attrs.get('status')}, wall time {tree.attrs.get('wall_time_s', float('nan')):.1f} s"
    )
    lines = (
        _report_estimation(tree, path) if study == "estimation" else _report_sampling(tree, path)
    )
    print("\n".join(lines))
    return 0


def _info(args) -> int:
    from .results import load_tree

    try:
        tree = load_tree(args.file)
    except (FileNotFoundError, OSError, ValueError) as err:
        print(f"mcm-prob: cannot read {args.file}: {err}", file=sys.stderr)
        return 1
    for key, value in tree.attrs.items():
        if key in ("config", "versions"):
            value = json.dumps(json.loads(value), indent=2, sort_keys=True)
        print(f"{key}: {value}")
    print("groups: " + ", ".join(node.path for node in tree.subtree))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mcm-prob", description="Multi-step consistency model studies with exact ground truth."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a study and write a netCDF file")
    run.add_argument("study", choices=("estimation", "sampling"))
    run.add_argument("--config", help="TOML file with an [estimation] or [sampling] table")
    run.add_argument("--quick", action="store_true", help="small settings (about a minute)")
    run.add_argument("--out", required=True, help="output netCDF file")
    mode = run.add_mutually_exclusive_group()
    mode.add_argument(
        "--resume", action="store_true", help="continue a partial file with the same config"
    )
    mode.add_argument("--overwrite", action="store_true", help="replace an existing file")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.set_defaults(func=_run)
    rep = sub.add_parser("report", help="print a summary and write plots next to the file")
    rep.add_argument("file")
    rep.set_defaults(func=_report)
    info = sub.add_parser("info", help="print the provenance of a results file")
    info.add_argument("file")
    info.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
