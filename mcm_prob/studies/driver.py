r"""The study driver: one loop that every study runs in.

A study (a subclass of `Study`) supplies small pure pieces: its config type and `--quick`
settings, the empty results `schema` with a boolean ``done`` variable over the cell dims, the
`cells` (positional indexers into ``done``), how to `run_cell` (writing into the dataset), how to
`finalize` (extra groups such as fitted rates, computed once every cell is done), and its
`report(tree) -> str` and `plot(tree) -> Figure`. The driver owns everything else:

* opening: the output location is checked writable before any work; an existing file is
  refused unless `resume` (same config, except the study's `analysis_keys`, which only the
  analysis reads: a changed one reruns the analysis and the earlier config is kept in the
  ``previous_configs`` attribute; any other change is refused with the differences named) or
  `overwrite`, which builds the new file in `staging_path(out)` (``OUT.partial``) and moves it
  over `out` only when it is finished, so a good file is never replaced by a worse one (an
  interrupted overwrite leaves `out` untouched, and the same call continues the staged file);
* one atomic save (`mcm_prob.results.save_tree`) after every finished cell, with a ``done`` mask,
  so an interruption loses at most the running cell and `resume=True` continues from the file;
  temporary files of killed writers are removed when the file is opened again;
* the ``status`` attribute: ``"partial"`` until every group, the analysis included, is
  written in one atomic save, then ``"complete"``; resuming a file whose cells are all done
  reruns only the analysis;
* provenance (versions, config JSON with every data spec, seeds, dtype, device, time);
* progress bars.

**Data entries.** A study config's ``data`` maps the user's labels to data: a spec dict
(`mcm_prob.data.from_spec`; an extra key ``delta`` sets that entry's early-stopping time) or,
from Python, any `mcm_prob.data.DataDistribution` object, including a user subclass. The file
stores each entry's spec, or for a family without a spec its class path, repr and a SHA-256 of
its arrays, so that a resume with a different object is refused.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import json
import math
import os
import re
import tempfile
import time
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import jax
import numpy as np
import xarray as xr
from jax.experimental import multihost_utils

from .._checks import number
from ..cache import cache_warnings_once, enable_compilation_cache
from ..data import DataDistribution, describe, from_spec
from ..datasets import image_shape
from ..devices import is_writer
from ..locks import writer_lock
from ..paths import OU, AbstractPath, path_of
from ..paths import describe as describe_path
from ..progress import progress_bar
from ..results import ResultsWriteError, load_tree, provenance, remove_stale_temps, save_tree

__all__ = [
    "Study",
    "StudyConfig",
    "StudyExists",
    "Entry",
    "data_entries",
    "image_variables",
    "image_entries",
    "N_IMAGES",
    "describe",
    "run_study",
    "merge_parts",
    "load_config",
    "config_diff",
    "TIME_UNITS",
]

TIME_UNITS = OU.units  # the default path's; a study's own are `config.time_units`
_LABEL = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")


class StudyExists(FileExistsError):
    """The output file exists and neither resume nor overwrite was asked for."""


# ------------------------------------------------------------------ data entries
@dataclasses.dataclass(frozen=True)
class Entry:
    """One data entry of a study (keyed by its label): the distribution, its recorded
    description and the early-stopping time given for it (None: the default of its regime)."""

    data: DataDistribution
    description: dict
    delta: float | None = None

    def to_json(self) -> dict:
        return self.description | ({} if self.delta is None else {"delta": self.delta})


def data_entries(data: Mapping, *, name: str = "data") -> dict[str, Entry]:
    """Validate a study's ``data`` table (label -> spec dict or distribution object)."""
    if not isinstance(data, Mapping) or not data:
        raise ValueError(
            f"config key `{name}` must be a non-empty table of entries, label -> data spec "
            f'(e.g. {{family = "gaussian", mean = [0.0], cov = [[1.0]]}}), got {data!r}'
        )
    out = {}
    for label, value in data.items():
        if not isinstance(label, str) or not _LABEL.match(label):
            raise ValueError(
                f"config key `{name}`: entry labels must start with a letter or '_' and contain "
                f"only letters, digits, '_', '-', '.', got {label!r}"
            )
        where = f"{name}.{label}"
        if isinstance(value, Entry):  # an already validated entry (e.g. dataclasses.replace)
            out[label] = value
            continue
        if isinstance(value, DataDistribution):
            dist, delta = value, None
        elif isinstance(value, Mapping):
            spec = dict(value)
            delta = spec.pop("delta", None)
            if delta is not None:
                delta = number(f"{where}.delta", delta, gt=0)
            try:
                dist = from_spec(spec)
            except (TypeError, ValueError) as err:
                raise ValueError(f"config key `{where}`: {err}") from err
        else:
            raise TypeError(
                f"config key `{where}` must be a data spec (a dict with 'family' or 'dataset') or a "
                f"mcm_prob.data.DataDistribution, got {type(value).__name__}"
            )
        out[label] = Entry(dist, describe(dist), delta)
    return out


N_IMAGES = 10  # draws of each sampler kept as pictures for image entries


def image_entries(res: xr.Dataset):
    """(label, the entry's results, (height, width)) for each image entry of a results
    dataset made with `image_variables`; none for other files."""
    if "image_height" not in res:
        return
    for e in res["entry"].values:
        r = res.sel(entry=e)
        shape = int(r["image_height"]), int(r["image_width"])
        if shape[0]:
            yield e, r, shape


def image_variables(entries) -> dict:
    """``image_height`` and ``image_width`` per entry (0: not images) as data variables, for a
    study whose entries include images (`mcm_prob.datasets.image_shape`); else empty."""
    shapes = [image_shape(e.data) for e in entries]
    if all(sh is None for sh in shapes):
        return {}
    shapes = [sh or (0, 0) for sh in shapes]
    return {
        "image_height": (
            ("entry",),
            np.array([h for h, _ in shapes]),
            {"long_name": "image rows (0: not images)"},
        ),
        "image_width": (
            ("entry",),
            np.array([w for _, w in shapes]),
            {"long_name": "image columns (0: not images)"},
        ),
    }


# ------------------------------------------------------------------ configs
def _jsonable(value):
    if isinstance(value, Entry):
        return value.to_json()
    if isinstance(value, AbstractPath):
        return describe_path(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and math.isinf(value):
        return repr(value)
    return value


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """Base of the study configs: frozen dataclasses whose ``data`` field holds the entries
    and whose ``path`` field the Gaussian path of every time in the study (a
    `mcm_prob.paths` object or its spec: ``path = "vp"`` or a ``[STUDY.path]`` table in TOML;
    default OU). The path is part of the config: a resume with another path is refused."""

    data: Any = None
    path: Any = "ou"

    def __post_init__(self):
        object.__setattr__(self, "data", data_entries(self.data))
        object.__setattr__(self, "path", path_of(self.path, "config key `path`"))

    @property
    def time_units(self) -> str:
        """The `units` of every time coordinate of the study's file (the path's time)."""
        return self.path.units

    @property
    def entries(self) -> dict[str, Entry]:
        return self.data

    def entry_delta(self, label: str) -> float:
        """An entry's early-stopping time: its own `delta`, else the config's `delta_smooth` or
        `delta_nonsmooth` for its regime (configs that use this define those two fields)."""
        entry = self.entries[label]
        if entry.delta is not None:
            return entry.delta
        return self.delta_smooth if entry.data.regime == "smooth" else self.delta_nonsmooth

    def entry_coords(self, deltas: bool = True) -> tuple[dict, dict]:
        """The ``entry`` coordinate with `regime`, `dim` (and `delta`) on it, and the
        ``spec:LABEL`` attributes that let a reader rebuild every entry's data."""
        labels, entries = list(self.entries), list(self.entries.values())
        coords = {
            "entry": ("entry", labels, {"long_name": "data entry (user label)"}),
            "regime": ("entry", [e.data.regime for e in entries], {"long_name": "regime"}),
            "dim": ("entry", [e.data.dim for e in entries], {"long_name": "data dimension d"}),
        }
        if deltas:
            coords["delta"] = (
                "entry",
                [self.entry_delta(g) for g in labels],
                {"long_name": "early-stopping time delta", "units": self.time_units},
            )
        specs = {f"spec:{g}": json.dumps(e.to_json()) for g, e in self.entries.items()}
        return coords, specs

    def to_json(self) -> str:
        """The full config (data specs included) as canonical JSON text."""
        return json.dumps(_jsonable(self), sort_keys=True)


def _deep_merge(base: dict, top: Mapping, nested: tuple[str, ...]) -> dict:
    out = dict(base)
    for key, value in top.items():
        if key in nested and isinstance(out.get(key), Mapping) and isinstance(value, Mapping):
            out[key] = dict(out[key]) | dict(value)
        else:
            out[key] = value
    return out


def build_config(cls: type[StudyConfig], values: Mapping, study: str):
    """`cls(**values)` after refusing unknown keys with the list of valid ones (and, for a key
    of another registered study, naming that study)."""
    from . import STUDIES

    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        owners = {
            key: name
            for name, other in STUDIES.items()
            for key in unknown
            if name != study and key in {f.name for f in dataclasses.fields(other.config_type)}
        }
        hint = "".join(f"; `{k}` is a key of the {n} study" for k, n in sorted(owners.items()))
        raise ValueError(
            f"unknown config key(s) {unknown} for the {study} study{hint}; valid keys: {valid}"
        )
    return cls(**values)


def load_config(path: str | Path | None, study: Study, *, quick: bool = False) -> StudyConfig:
    """The study's config from a TOML file's ``[NAME]`` table (or its top level when the file
    has no tables), over the `--quick` settings if asked; nested tables (e.g. ``train``) merge
    key by key, ``data`` replaces the default entries. Every key is checked here, before any
    work: tables other than registered study names, keys outside the study's table when the file
    has tables, unknown keys and bad values are refused, naming the key or table."""
    from . import STUDIES

    values = dict(study.quick) if quick else {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist or is not a file")
        try:
            raw = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"config file {path} is not valid TOML: {err}") from err
        tables = [k for k, v in raw.items() if isinstance(v, dict)]
        strays = sorted(set(tables) - set(STUDIES))
        if strays:
            raise ValueError(
                f"config file {path}: unknown table(s) {['[' + t + ']' for t in strays]}; a table "
                f"names a study, one of {sorted(STUDIES)}"
            )
        if tables:
            loose = sorted(set(raw) - set(tables))
            if loose:
                raise ValueError(
                    f"config file {path}: key(s) {loose} outside a study table; put them under "
                    f"[{study.name}]"
                )
            if study.name not in raw:
                raise ValueError(
                    f"config file {path} has no [{study.name}] table (found {tables}); put the "
                    f"{study.name} settings under [{study.name}]"
                )
            table = raw[study.name]
        else:
            table = raw
        values = _deep_merge(values, table, study.nested)
    return build_config(study.config_type, values, study.name)


def config_diff(old: Any, new: Any, path: str = "") -> list[str]:
    """Human-readable differences between two decoded JSON configs."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            sub = f"{path}.{key}" if path else key
            if key not in old:
                out.append(f"{sub}: added ({_short(new[key])})")
            elif key not in new:
                out.append(f"{sub}: removed (was {_short(old[key])})")
            else:
                out += config_diff(old[key], new[key], sub)
        return out
    return [] if old == new else [f"{path}: {_short(old)} in the file, {_short(new)} now"]


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ------------------------------------------------------------------ studies
class Study(abc.ABC):
    """A registered study: its name, config type, `--quick` settings and the pieces the driver
    calls (see the module docstring)."""

    name: ClassVar[str]
    config_type: ClassVar[type[StudyConfig]]
    quick: ClassVar[dict] = {}
    nested: ClassVar[tuple[str, ...]] = ()  # config keys holding sub-tables merged key by key
    # config keys that only `finalize` reads: they may change on resume (the analysis reruns)
    analysis_keys: ClassVar[tuple[str, ...]] = ()

    @abc.abstractmethod
    def schema(self, config) -> xr.Dataset:
        """The empty results (NaN) with a boolean ``done`` variable over the cell dims."""

    @abc.abstractmethod
    def cells(self, config) -> list[dict[str, int]]:
        """The cells, as positional indexers into ``done``, in running order."""

    @abc.abstractmethod
    def run_cell(self, config, ds: xr.Dataset, cell: dict, cache: dict, *, progress: bool) -> None:
        """Compute one cell and write it into `ds`; `cache` persists across the cells of a run."""

    def finalize(self, config, ds: xr.Dataset, *, progress: bool) -> dict[str, xr.Dataset]:
        """Extra groups computed once every cell is done (default: none); with `progress`,
        say what is being computed (`mcm_prob.progress`)."""
        return {}

    def seeds(self, config) -> tuple[int, ...]:
        return tuple(getattr(config, "seeds", ()))

    def dtype(self, config) -> str:
        return str(jax.numpy.result_type(float))

    @abc.abstractmethod
    def report(self, tree: xr.DataTree) -> str:
        """The summary table of a (possibly partial) results file."""

    @abc.abstractmethod
    def plot(self, tree: xr.DataTree):
        """A matplotlib Figure of the results."""

    def figures(self, tree: xr.DataTree) -> dict:
        """Further figures, name -> matplotlib Figure (e.g. pictures of image entries' draws);
        `mcm-prob report FILE.nc` saves each as FILE_STUDY_NAME.png. None by default."""
        return {}


def _blocking_changes(old_json: str, new_json: str, analysis: tuple[str, ...]) -> list[str]:
    """The differences between two configs outside the `analysis` keys."""
    try:
        changes = config_diff(json.loads(old_json), json.loads(new_json))
    except (TypeError, ValueError):
        return ["the file's config is not readable JSON"]
    return [c for c in changes if c.split(".")[0].split(":")[0] not in analysis]


_MERGE_HINT = "Pass the --config (and --quick) the parts were run with"


def _with_new_keys(old_json, config_type: type) -> str:
    """The file's config with the top-level keys added to `config_type` since it was written
    set to their defaults: a key's default keeps the behaviour from before the key existed,
    so such a file resumes and merges as before (the same key at another value differs)."""
    try:
        old = json.loads(old_json)
    except (TypeError, ValueError):
        return old_json
    if not isinstance(old, dict):
        return old_json
    for f in dataclasses.fields(config_type):
        if f.name not in old and f.default is not dataclasses.MISSING:
            old[f.name] = _jsonable(f.default)
    return json.dumps(old, sort_keys=True)


def _previous(path: Path, config, study: Study, what: str) -> tuple[xr.DataTree, list]:
    """The tree in `path` if it holds `study` with `config` up to the study's analysis keys
    (every key when `what` is ``"merge"``: parts are merged only with their own config) and
    the layout `config` gives, and the list of earlier configs to record (the file's, plus its
    config if that differs)."""
    cfg_json = config.to_json()
    try:
        tree = load_tree(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {path} to {what} it: {err}") from err
    if tree.attrs.get("study") != study.name or "results" not in tree.children:
        raise ValueError(f"{path} holds a {tree.attrs.get('study')!r} study, not {study.name!r}")
    written = tree.attrs.get("config")
    old = _with_new_keys(written, type(config))
    history = _json_list(tree.attrs.get("previous_configs"))
    if old == cfg_json:
        _check_structure(path, tree["results"].to_dataset(), study.schema(config), what)
        _check_done(path, tree["results"].to_dataset(), study.cells(config), what)
        return tree, history
    blocking = _blocking_changes(old, cfg_json, () if what == "merge" else study.analysis_keys)
    if blocking:
        hint = _MERGE_HINT if what == "merge" else "Use --overwrite or another --out"
        raise ValueError(
            f"{path} was written with a different config; cannot {what} it. Differences: "
            + "; ".join(blocking)
            + f". {hint}"
        )
    # analysis keys changed: the layout is the file's config's, so only names are compared
    _check_structure(path, tree["results"].to_dataset(), study.schema(config), what, exact=False)
    _check_done(path, tree["results"].to_dataset(), study.cells(config), what)
    return tree, history + [written]


def _check_structure(
    path: Path, ds: xr.Dataset, want: xr.Dataset, what: str, exact: bool = True
) -> None:
    """The file's `/results` must have the layout `want` (the config's `study.schema`): every
    coordinate with its values, every variable with its dimensions (with `exact` False, only
    the names of coordinates, variables and dimensions). A file altered or damaged outside
    mcm_prob is refused by name instead of failing later with a KeyError."""
    problems = []
    for c in want.coords:
        if c not in ds.coords:
            problems.append(f"coordinate {c!r} missing")
        elif exact and (
            ds[c].shape != want[c].shape or not np.array_equal(ds[c].values, want[c].values)
        ):
            problems.append(
                f"coordinate {c!r} is {ds[c].values.tolist()}, the config gives "
                f"{want[c].values.tolist()}"
            )
    problems += [f"variable {v!r} missing" for v in want.data_vars if v not in ds.data_vars]
    problems += [
        f"{v!r} has dims {ds[v].dims} {tuple(ds[v].shape)}, the config gives "
        f"{want[v].dims} {tuple(want[v].shape)}"
        for v in want.data_vars
        if v in ds.data_vars
        and (ds[v].dims, ds[v].shape if exact else 0)
        != (want[v].dims, want[v].shape if exact else 0)
    ]
    if problems:
        raise ValueError(
            f"{path} does not have the layout of its config, so it was altered or damaged "
            f"outside mcm_prob; cannot {what} it: "
            + "; ".join(problems[:4])
            + ("; ..." if len(problems) > 4 else "")
        )


def _check_done(path: Path, ds: xr.Dataset, cells: list[dict], what: str) -> None:
    """A cell whose `done` flag is set must hold something: refuse a file in which a done
    cell's every float result is NaN and none of its flags is set (such a cell was never
    computed: the file was altered or damaged, and resuming it would report NaN as done)."""
    empty = []
    for cell in cells:
        if not bool(ds["done"][cell].all()):
            continue
        inside = [ds[v][cell] for v in ds.data_vars if v != "done" and set(cell) <= set(ds[v].dims)]
        floats = [a for a in inside if a.dtype.kind in "fc"]
        flags = [a for a in inside if a.dtype.kind == "b"]
        if floats and all(bool(a.isnull().all()) for a in floats):
            if not any(bool(a.any()) for a in flags):
                empty.append(", ".join(f"{d}={ds[d].values[i]}" for d, i in cell.items()))
    if empty:
        raise ValueError(
            f"{path} marks {len(empty)} cell(s) done that hold no results (every value NaN: "
            f"{'; '.join(empty[:3])}{'; ...' if len(empty) > 3 else ''}), so it was altered or "
            f"damaged outside mcm_prob; cannot {what} it: run it again with --overwrite"
        )


def _json_list(text) -> list:
    try:
        value = json.loads(text) if isinstance(text, str) else []
    except ValueError:
        return []
    return value if isinstance(value, list) else []


def staging_path(out: str | Path) -> Path:
    """Where `run_study(..., overwrite=True)` builds the new file before it replaces `out`."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def _check_output(out: Path) -> None:
    """Refuse an output path that cannot be written, before any work: a directory, a parent
    that is a file, a folder that cannot be created or written."""
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; give a file name such as {out / 'study.nc'}")
    parent = out.parent
    for p in (parent, *parent.parents):
        if p.exists() and not p.is_dir():
            raise ValueError(f"--out {out}: {p} is a file, not a directory")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f"{out.name}.", suffix=".tmp", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ResultsWriteError(
            f"cannot write results to {out}: {err.strerror or err} ({parent})"
        ) from err


def _require_x64() -> None:
    if not jax.config.jax_enable_x64:
        raise ValueError(
            "studies compute ground truth in float64: call "
            'jax.config.update("jax_enable_x64", True) before running one (the mcm-prob '
            "command does this for its own process)"
        )


def run_study(
    study: Study,
    config,
    out: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    part: tuple[int, int] | None = None,
) -> xr.DataTree:
    """Run (or resume) `study` with `config`, saving `out` after every finished cell.

    `stop_after`: return after that many newly finished cells (the file is then partial and
    `resume=True` completes it). Interruptions (KeyboardInterrupt) keep the finished cells.
    `part` = (i, n): run only cells i, i + n, i + 2n, ... (process i of n, e.g. one per host
    after `jax.distributed.initialize`, with ``(jax.process_index(), jax.process_count())``);
    the file stays ``"partial"`` with attribute ``part`` = "i/n", and `merge_parts` combines
    the n files into one and runs the analysis.
    JAX's persistent compilation cache is turned on (`mcm_prob.cache`; opt out with
    ``MCM_PROB_COMPILATION_CACHE=off``) and its directory recorded in the provenance. The run
    holds the lock ``out.lock`` (`mcm_prob.locks`): a second run on the same `out` is refused
    with `OutputBusy` before any work.
    """
    if part is not None:
        part = _part(part)
    if not isinstance(config, study.config_type):
        raise TypeError(
            f"`config` must be a {study.config_type.__name__} for the {study.name} study, "
            f"got {type(config).__name__}"
        )
    if resume and overwrite:
        raise ValueError("pass at most one of `resume` and `overwrite`")
    _require_x64()
    out = Path(out)
    if not is_writer():  # a multi-controller run: process 0 checks, locks and writes
        return _run_locked(study, config, out, resume, overwrite, False, stop_after, part)
    _check_output(out)
    with writer_lock(out):
        return _run_locked(study, config, out, resume, overwrite, progress, stop_after, part)


def _run_locked(study, config, out, resume, overwrite, progress, stop_after, part):
    """`run_study` while holding the output's writer lock (process 0 of a multi-controller
    run; the other processes compute the same cells and write nothing)."""
    writer = is_writer()
    if writer:
        remove_stale_temps(out)
    cfg_json = config.to_json()
    target, previous, history = out, None, []
    if out.exists() and not (resume or overwrite):
        raise StudyExists(
            f"{out} exists: pass --resume to continue it (same config) or --overwrite to replace it"
        )
    if overwrite and out.exists():
        target = staging_path(out)
        remove_stale_temps(target)
        if target.exists():  # an interrupted overwrite: continue it if the config allows
            with contextlib.suppress(ValueError):
                previous, history = _previous(target, config, study, "continue")
    elif resume:
        if not out.exists():
            raise FileNotFoundError(f"--resume given but {out} does not exist")
        previous, history = _previous(out, config, study, "resume")
        _check_part(out, previous, part)
    enable_compilation_cache()
    _sync("mcm_prob: the previous file is read")  # before process 0 writes anything
    with cache_warnings_once():  # a cache that fails mid-run: one line, not one per program
        start = time.perf_counter()
        ds = study.schema(config) if previous is None else previous["results"].to_dataset()
        elapsed = 0.0 if previous is None else float(previous.attrs.get("wall_time_s", 0.0))
        fixed = {} if part is None else {"part": f"{part[0]}/{part[1]}"}
        if history:
            fixed["previous_configs"] = json.dumps(history)

        def save(groups: dict, status: str) -> None:
            if writer:
                wall = elapsed + time.perf_counter() - start
                _save(study, config, cfg_json, groups, wall, {"status": status} | fixed, target)

        cells = study.cells(config)
        if part is not None:
            cells = cells[part[0] :: part[1]]
        todo = [c for c in cells if not bool(ds["done"][c].all())]
        cache: dict = {}
        with progress_bar(
            len(cells), f"{study.name} cells", initial=len(cells) - len(todo), enabled=progress
        ) as bar:
            for n, cell in enumerate(todo, 1):
                study.run_cell(config, ds, cell, cache, progress=progress)
                ds["done"][cell] = True
                save({"/results": ds}, "partial")
                bar.update(1)
                if stop_after is not None and n >= stop_after and n < len(todo):
                    _sync("mcm_prob: stopped")
                    return load_tree(target)
        if part is not None:
            save({"/results": ds}, "partial")
        else:
            save({"/results": ds} | study.finalize(config, ds, progress=progress), "complete")
        if target != out and writer:
            try:
                os.replace(target, out)
            except OSError as err:
                raise ResultsWriteError(
                    f"could not move the finished {target} over {out}: {err.strerror or err}"
                ) from err
        _sync("mcm_prob: written")
        return load_tree(out)


def _sync(name: str) -> None:
    """Wait for every process of a multi-controller run (nothing to wait for when alone)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _check_part(out: Path, tree: xr.DataTree, part) -> None:
    """A file is resumed as what it is: the whole run, or the part it was run as (a complete
    file is never turned back into a part)."""
    held = tree.attrs.get("part")
    asked = None if part is None else f"{part[0]}/{part[1]}"
    if held != asked:
        what = lambda p: "the whole run" if p is None else f"part {p}"  # noqa: E731
        raise ValueError(
            f"{out} holds {what(held)} ({tree.attrs.get('status')}); cannot resume it as "
            f"{what(asked)}: resume it with the --part it was run with"
            + ("" if held is None else " (or combine the parts with `mcm-prob merge`)")
        )


def _part(part) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in part)
        ok = 0 <= i < n and tuple(part) == (i, n)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"`part` must be (i, n) with integers 0 <= i < n, got {part!r}")
    return i, n


def merge_parts(
    study: Study, config, parts, out: str | Path, *, overwrite: bool = False, progress: bool = False
) -> xr.DataTree:
    """Combine the files of a run split with `run_study(..., part=(i, n))` into `out`.

    Every part must hold this study with exactly this config (`--quick` and the analysis
    settings included: the parts' configs are compared key by key and the differences named).
    A cell's values come from the part that finished it; values outside the cells (per-entry
    references) from the first part that has them. When every cell is done the study's
    analysis runs and `out` is complete; otherwise it stays partial and
    `run_study(..., resume=True)` finishes it. Wall times add. An existing `out` is replaced
    (atomically, after the merge succeeded) only with `overwrite`. `progress`: of the analysis.
    """
    _require_x64()
    parts, out = [Path(p) for p in parts], Path(out)
    if not parts:
        raise ValueError("`parts` must name at least one partial result file")
    _check_output(out)
    with writer_lock(out):
        return _merge_locked(study, config, parts, out, overwrite, progress)


def _merge_locked(study, config, parts, out, overwrite, progress):
    """`merge_parts` while holding the output's writer lock."""
    if out.exists() and not overwrite:
        raise StudyExists(f"{out} exists: merge into a new file or pass --overwrite")
    cfg_json = config.to_json()
    for p in parts:
        if not p.is_file():
            raise FileNotFoundError(f"part file {p} does not exist")
    trees = [_previous(p, config, study, "merge")[0] for p in parts]  # every key equal
    merged = trees[0]["results"].to_dataset()
    done_dims = merged["done"].dims
    for tree in trees[1:]:
        ds = tree["results"].to_dataset()
        done = ds["done"]
        for name, var in ds.data_vars.items():
            if name == "done":
                continue
            if set(done_dims) <= set(var.dims):
                merged[name] = xr.where(done, var, merged[name]).transpose(*var.dims)
            else:
                merged[name] = merged[name].fillna(var) if var.dtype.kind == "f" else merged[name]
        merged["done"] = merged["done"] | done
    for name, var in trees[0]["results"].to_dataset().data_vars.items():
        merged[name].attrs = var.attrs
    wall = sum(float(t.attrs.get("wall_time_s", 0.0)) for t in trees)
    complete = bool(merged["done"].all())
    analysis = study.finalize(config, merged, progress=progress) if complete else {}
    groups = {"/results": merged} | analysis
    extra = {"status": "complete" if complete else "partial", "merged_from": len(parts)}
    _save(study, config, cfg_json, groups, wall, extra, out)
    return load_tree(out)


def _save(study: Study, config, cfg_json: str, groups: dict, wall: float, extra: dict, out):
    """Write `groups` atomically to `out` with the provenance attributes and `extra`."""
    tree = xr.DataTree.from_dict(groups)
    tree.attrs = (
        provenance(
            config_json=cfg_json,
            seeds=study.seeds(config),
            dtype=study.dtype(config),
            wall_time=wall,
            study=study.name,
        )
        | extra
    )
    save_tree(tree, out)
