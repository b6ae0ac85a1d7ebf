"""The `mcm-prob` command line: it only parses arguments; the studies do the work.

    mcm-prob run STUDY [--config FILE.toml] [--quick] --out FILE.nc [--resume | --overwrite]
                       [--part I/N]
    mcm-prob merge STUDY PART.nc... [--config FILE.toml] [--quick] --out FILE.nc [--overwrite]
    mcm-prob report FILE.nc      # summary table on stdout, a PNG plot next to the file
    mcm-prob info FILE.nc        # provenance and the data specs

STUDY is any registered study (`mcm_prob.studies.STUDIES`). Ground truth runs in float64 (the
command enables JAX's x64 mode for its own process); networks train in float32 by default, as
the files' `dtype` attribute says. On a CPU the command gives XLA one device per core
(`mcm_prob.devices`), over which training grids are sharded.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path


def _fail(message: str, code: int = 1) -> int:
    print(f"mcm-prob: {message}", file=sys.stderr)
    return code


def _run(args) -> int:
    from .devices import initialize_distributed, reproducible_gpu_kernels, use_every_cpu_core

    use_every_cpu_core()  # before JAX starts: fit_grid spreads its models over the cores
    reproducible_gpu_kernels()  # and a GPU run compiled afresh repeats its numbers
    if getattr(args, "distributed", False):
        try:
            index, count = initialize_distributed(
                args.coordinator, args.num_processes, args.process_id
            )
        except (ValueError, RuntimeError) as err:
            return _fail(f"--distributed: {err}", 2)
        try:
            return _run_study(args)  # JAX shuts the run down with every process at exit
        except BaseException as err:  # a process of the run stopped, or this one failed
            code = _fail(
                f"process {index} of {count}: the run stopped ({type(err).__name__}: "
                f"{str(err)[:500]}); the cells finished before are saved in {args.out}: start "
                "every process again with --resume"
            )
        # leave at once: JAX's shutdown would wait for the lost process, then abort
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    elif any(
        getattr(args, k, None) is not None for k in ("coordinator", "num_processes", "process_id")
    ):
        return _fail("--coordinator, --num-processes and --process-id go with --distributed", 2)
    return _run_study(args)


def _run_study(args) -> int:
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
            tree = studies.merge(
                study.name,
                config,
                args.parts,
                out,
                overwrite=args.overwrite,
                progress=not args.no_progress,
            )
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
    except (studies.StudyExists, studies.OutputBusy, ValueError, TypeError, OSError) as err:
        return _fail(str(err))
    except KeyboardInterrupt:
        staged = studies.staging_path(out)
        if args.command == "run" and args.overwrite and staged.exists():
            where = f"{staged} ({out} is unchanged). Continue with the same command"
        elif out.exists():
            where = f"{out}. Continue with the same command plus --resume"
        else:
            return _fail("interrupted before the first cell finished; nothing was saved.", 130)
        return _fail(f"interrupted; finished cells are saved in {where}.", 130)
    if jax.process_index() == 0:
        print(
            f"wrote {out} ({tree.attrs.get('status')}, wall time {tree.attrs.get('wall_time_s', float('nan')):.1f} s)"
        )
    return 0


def _parse_part(text: str | None):
    if text is None:
        return None
    i, sep, n = text.partition("/")
    if not (sep and all(v.strip().isascii() and v.strip().isdigit() for v in (i, n))):
        raise ValueError(f"--part must look like I/N (e.g. 0/2), got {text!r}")
    return int(i), int(n)


def _load(path: Path):
    from .results import load_tree

    try:
        return load_tree(path), None
    except (OSError, ValueError) as err:
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
    try:
        table = studies.report(tree)
    except Exception as err:  # a damaged or foreign file: say so, no traceback
        return _fail(
            f"{path}: cannot summarise this {study.name} file ({type(err).__name__}: {err})"
        )
    print(
        f"{path}: {study.name} study, {_text(tree.attrs.get('status'), 40)}, "
        f"wall time {_number(tree.attrs.get('wall_time_s'))} s"
    )
    print(table)
    sys.stdout.flush()  # the table is out before the plot can fail
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        figures = {"": study.plot(tree)} | {f"_{k}": v for k, v in study.figures(tree).items()}
    except Exception as err:
        plt.close("all")
        return _fail(f"{path}: cannot plot this file ({type(err).__name__}: {err})")
    from .results import write_atomic

    try:
        for suffix, fig in figures.items():
            png = path.with_name(f"{path.stem}_{study.name}{suffix}.png")
            try:  # atomic: a full disk leaves an earlier plot whole, not truncated
                buffer = io.BytesIO()
                fig.savefig(buffer, format="png", dpi=120)
                write_atomic(png, buffer.getbuffer())
            except OSError as err:
                reason = getattr(err.__cause__, "strerror", None) or err.strerror or err
                return _fail(f"could not save the plot {png}: {reason} (the table is above)")
            print(f"plot: {png}")
    finally:
        plt.close("all")
    return 0


_LIMIT = 2000  # characters printed of one attribute


def _text(value, limit: int = _LIMIT) -> str:
    """`value` as one printable line: control and escape characters shown escaped, at most
    `limit` characters (the total length said when cut)."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "backslashreplace")
    text = value if isinstance(value, str) else str(value)
    out = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)
    if len(out) > limit:
        out = f"{out[:limit]}... ({len(text)} characters in all)"
    return out


def _number(value) -> str:
    try:
        return f"{float(value):.1f}"
    except (TypeError, ValueError):
        return "?"


def _attrs_only(path: Path):
    """The root attributes, the /results attributes and the group paths of a netCDF-4 file,
    read without loading any array."""
    import h5netcdf

    groups = []
    with h5netcdf.File(path, "r") as f:
        root = dict(f.attrs)
        results = dict(f.groups["results"].attrs) if "results" in f.groups else {}

        def walk(group, name):
            groups.append(name)
            for child_name, child in group.groups.items():
                walk(child, f"{name.rstrip('/')}/{child_name}")

        walk(f, "/")
    return root, results, groups


def _info(args) -> int:
    path = Path(args.file)
    if not path.is_file():
        return _fail(f"cannot read {path}: no such file")
    try:
        root, results, groups = _attrs_only(path)
    except Exception as err:  # h5py raises many types for non-HDF5 input
        return _fail(
            f"cannot read {path}: not a netCDF-4 file ({type(err).__name__}: {_text(err, 200)})"
        )
    for key, value in root.items():
        if key in ("config", "versions", "previous_configs"):
            value = _json_block(value)
        else:
            value = _text(value)
        print(f"{_text(key, 100)}: {value}")
    for key, value in results.items():
        if isinstance(key, str) and key.startswith("spec:"):
            print(f"data entry {_text(key[5:], 100)}: {_text(value)}")
    print("groups: " + _text(", ".join(groups)))
    return 0


def _json_block(value) -> str:
    """A JSON attribute as indented `key: value` lines, or a note saying it is malformed."""
    if not isinstance(value, str):
        return f"<malformed: expected JSON text, got {type(value).__name__}> {_text(value, 200)}"
    try:
        table = json.loads(value)
    except ValueError:
        return f"<malformed: not valid JSON> {_text(value, 200)}"
    if isinstance(table, list):
        return "".join(f"\n  - {_text(json.dumps(v))}" for v in table)
    if not isinstance(table, dict):
        return f"<malformed: expected a JSON object> {_text(value, 200)}"
    return "".join(f"\n  {_text(k, 100)}: {_text(json.dumps(v))}" for k, v in sorted(table.items()))


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
    run.add_argument(
        "--distributed",
        action="store_true",
        help="one of several processes of one run (jax.distributed, docs/scaling.md): the "
        "cluster's settings (SLURM, Open MPI) or the three options below; process 0 writes",
    )
    run.add_argument("--coordinator", help="HOST:PORT of process 0 (with --distributed)")
    run.add_argument("--num-processes", type=int, help="the process count (with --distributed)")
    run.add_argument("--process-id", type=int, help="this process's index (with --distributed)")
    run.set_defaults(func=_run)
    merge = sub.add_parser(
        "merge", help="combine the part files of a split run (--part I/N) into one file"
    )
    merge.add_argument("study", choices=sorted(STUDIES))
    merge.add_argument("parts", nargs="+", help="the part files")
    merge.add_argument("--config", help="the TOML file the parts were run with")
    merge.add_argument("--quick", action="store_true", help="the parts were run with --quick")
    merge.add_argument("--out", required=True, help="output netCDF file")
    merge.add_argument(
        "--overwrite", action="store_true", help="replace --out if it exists (after the merge)"
    )
    merge.add_argument("--no-progress", action="store_true", help="no progress display")
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
    try:
        code = args.func(args)
        sys.stdout.flush()
    except BrokenPipeError:  # `mcm-prob report x.nc | head`: the reader left, nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
