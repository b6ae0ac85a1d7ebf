"""The `mcm-prob` command line: it only parses arguments; the studies do the work.

    mcm-prob run STUDY [--config FILE.toml] [--quick] --out FILE.nc [--resume | --overwrite]
                       [--part I/N]
    mcm-prob merge STUDY PART.nc... [--config FILE.toml] [--quick] --out FILE.nc
    mcm-prob report FILE.nc      # summary table on stdout, a PNG plot next to the file
    mcm-prob info FILE.nc        # provenance and the data specs

STUDY is any registered study (`mcm_prob.studies.STUDIES`). Ground truth runs in float64 (the
command enables JAX's x64 mode for its own process); networks train in float32 by default, as
the files' `dtype` attribute says. On a CPU the command gives XLA one device per core
(`mcm_prob.devices`), over which training grids are sharded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _fail(message: str, code: int = 1) -> int:
    print(f"mcm-prob: {message}", file=sys.stderr)
    return code


def _run(args) -> int:
    from .devices import use_every_cpu_core

    use_every_cpu_core()  # before JAX starts: fit_grid spreads its models over the cores
    import jax

    from . import studies

    jax.config.update("jax_enable_x64", True)
    study = studies.get(args.study)
    try:
        config = studies.load_config(args.config, study, quick=args.quick)
    except (ValueError, TypeError) as err:
        return _fail(f"bad config: {err}", 2)
    out = Path(args.out)
    try:
        part = _parse_part(args.part)
        if args.command == "merge":
            tree = studies.merge(study.name, config, args.parts, out)
        else:
            tree = studies.run_study(
                study,
                config,
                out,
                resume=args.resume,
                overwrite=args.overwrite,
                progress=not args.no_progress,
                part=part,
            )
    except (studies.StudyExists, ValueError, FileNotFoundError) as err:
        return _fail(str(err))
    except KeyboardInterrupt:
        return _fail(
            f"interrupted; finished cells are saved in {out}. Continue with the same command plus --resume.",
            130,
        )
    print(
        f"wrote {out} ({tree.attrs.get('status')}, wall time {tree.attrs.get('wall_time_s', float('nan')):.1f} s)"
    )
    return 0


def _parse_part(text: str | None):
    if text is None:
        return None
    i, sep, n = text.partition("/")
    if not (sep and i.strip().isdigit() and n.strip().isdigit()):
        raise ValueError(f"--part must look like I/N (e.g. 0/2), got {text!r}")
    return int(i), int(n)


def _load(path: Path):
    from .results import load_tree

    try:
        return load_tree(path), None
    except (FileNotFoundError, OSError, ValueError) as err:
        return None, f"cannot read {path}: {err}"


def _report(args) -> int:
    from . import studies

    path = Path(args.file)
    tree, error = _load(path)
    if error:
        return _fail(error)
    try:
        study = studies.study_of(tree)
    except studies.NotAStudyFile as err:
        return _fail(f"{path}: {err}")
    print(
        f"{path}: {study.name} study, {tree.attrs.get('status')}, "
        f"wall time {float(tree.attrs.get('wall_time_s', float('nan'))):.1f} s"
    )
    print(study.report(tree))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = study.plot(tree)
    png = path.with_name(f"{path.stem}_{study.name}.png")
    try:
        fig.savefig(png, dpi=120)
    except OSError as err:
        return _fail(f"could not save the plot {png}: {err}")
    finally:
        plt.close(fig)
    print(f"plot: {png}")
    return 0


def _info(args) -> int:
    path = Path(args.file)
    tree, error = _load(path)
    if error:
        return _fail(error)
    for key, value in tree.attrs.items():
        if key in ("config", "versions"):
            try:
                table = json.loads(value)
                value = "".join(f"\n  {k}: {json.dumps(v)}" for k, v in sorted(table.items()))
            except (TypeError, ValueError, AttributeError):
                value = f"{value!r} (not valid JSON)"
        print(f"{key}: {value}")
    if "results" in tree.children:
        for key, value in tree["results"].attrs.items():
            if key.startswith("spec:"):
                print(f"data entry {key[5:]}: {value}")
    print("groups: " + ", ".join(node.path for node in tree.subtree))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .studies import STUDIES

    parser = argparse.ArgumentParser(
        prog="mcm-prob", description="Multi-step consistency model studies with exact ground truth."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a study and write a netCDF file")
    run.add_argument("study", choices=sorted(STUDIES))
    run.add_argument("--config", help="TOML file with a [STUDY] table (e.g. [estimation])")
    run.add_argument("--quick", action="store_true", help="small settings (about a minute)")
    run.add_argument("--out", required=True, help="output netCDF file")
    mode = run.add_mutually_exclusive_group()
    mode.add_argument(
        "--resume", action="store_true", help="continue a partial file with the same config"
    )
    mode.add_argument("--overwrite", action="store_true", help="replace an existing file")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument(
        "--part",
        help="I/N: run only every N-th cell from cell I (process I of N, e.g. one per host); "
        "combine the N files with `mcm-prob merge`",
    )
    run.set_defaults(func=_run)
    merge = sub.add_parser(
        "merge", help="combine the part files of a split run (--part I/N) into one file"
    )
    merge.add_argument("study", choices=sorted(STUDIES))
    merge.add_argument("parts", nargs="+", help="the part files")
    merge.add_argument("--config", help="the TOML file the parts were run with")
    merge.add_argument("--quick", action="store_true", help="the parts were run with --quick")
    merge.add_argument("--out", required=True, help="output netCDF file")
    merge.set_defaults(func=_run, part=None)
    rep = sub.add_parser("report", help="print a summary and write a plot next to the file")
    rep.add_argument("file")
    rep.set_defaults(func=_report)
    info = sub.add_parser("info", help="print the provenance and data specs of a results file")
    info.add_argument("file")
    info.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
