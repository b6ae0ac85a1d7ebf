"""Error studies on the user's data, run by one driver and registered by name.

    from mcm_prob import studies
    cfg = studies.EstimationConfig(data={"mix4d": spec_or_distribution}, steps=(0.1, 0.2))
    tree = studies.run_estimation(cfg, "est.nc")          # or run("estimation", cfg, "est.nc")
    print(studies.report(tree)); studies.plot(tree).savefig("est.png")

Registered studies (`STUDIES`): ``"estimation"`` (consistency error versus the discretization
step, checked rate analysis), ``"sampling"`` (exact KL of the multi-step sampler versus steps,
with diffusion baselines), ``"error_injection"`` (KL versus an injected consistency error),
``"schedules"`` (exact KL of named and optimised sampler schedules). Add
your own with `register(MyStudy())`; `mcm-prob run/report/info` then work for it too.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import xarray as xr

from .. import paths
from ..locks import OutputBusy
from .driver import (
    Entry,
    Study,
    StudyConfig,
    StudyExists,
    config_diff,
    data_entries,
    describe,
    load_config,
    merge_parts,
    run_study,
    staging_path,
)
from .error_injection import InjectionConfig, InjectionStudy
from .estimation import EstimationConfig, EstimationStudy
from .sampling import SamplingConfig, SamplingStudy
from .schedules import SchedulesConfig, SchedulesStudy

__all__ = [
    "STUDIES",
    "register",
    "get",
    "run",
    "merge",
    "run_estimation",
    "run_sampling",
    "run_error_injection",
    "report",
    "path_line",
    "plot",
    "load_config",
    "Study",
    "StudyConfig",
    "StudyExists",
    "OutputBusy",
    "staging_path",
    "NotAStudyFile",
    "study_of",
    "Entry",
    "data_entries",
    "describe",
    "config_diff",
    "EstimationConfig",
    "SamplingConfig",
    "InjectionConfig",
    "SchedulesConfig",
    "run_schedules",
]

STUDIES: dict[str, Study] = {}


class NotAStudyFile(ValueError):
    """A results tree that no registered study wrote."""


def register(study: Study) -> Study:
    """Add `study` to the registry under `study.name` (replacing one of the same name)."""
    if not isinstance(study, Study):
        raise TypeError(
            f"`study` must be a mcm_prob.studies.Study instance, got {type(study).__name__}"
        )
    STUDIES[study.name] = study
    return study


for _study in (EstimationStudy(), SamplingStudy(), InjectionStudy(), SchedulesStudy()):
    register(_study)


def get(name: str) -> Study:
    """The registered study called `name`."""
    if name not in STUDIES:
        raise ValueError(f"unknown study {name!r}; registered studies: {sorted(STUDIES)}")
    return STUDIES[name]


def run(name: str, config, out: str | Path, **kwargs) -> xr.DataTree:
    """Run the registered study `name` (keyword arguments as `run_study`)."""
    return run_study(get(name), config, out, **kwargs)


def merge(name: str, config, parts, out: str | Path, **kwargs) -> xr.DataTree:
    """Merge the part files of the registered study `name` (keyword arguments and the rest:
    `driver.merge_parts`)."""
    return merge_parts(get(name), config, parts, out, **kwargs)


def _with_data(config, data):
    return config if data is None else dataclasses.replace(config, data=data)


def run_estimation(
    config: EstimationConfig | None = None, out="estimation.nc", *, data=None, **kwargs
):
    """The estimation study; `data` (label -> spec or distribution) replaces `config.data`."""
    return run("estimation", _with_data(config or EstimationConfig(), data), out, **kwargs)


def run_sampling(config: SamplingConfig | None = None, out="sampling.nc", *, data=None, **kwargs):
    """The sampling study; `data` (label -> Gaussian or box spec/object) replaces `config.data`."""
    return run("sampling", _with_data(config or SamplingConfig(), data), out, **kwargs)


def run_error_injection(
    config: InjectionConfig | None = None, out="error_injection.nc", *, data=None, **kwargs
):
    """The error-injection study; `data` (label -> Gaussian spec/object) replaces `config.data`."""
    return run("error_injection", _with_data(config or InjectionConfig(), data), out, **kwargs)


def run_schedules(
    config: SchedulesConfig | None = None, out="schedules.nc", *, data=None, **kwargs
):
    """The schedules study; `data` (label -> Gaussian or box spec/object) replaces `config.data`."""
    return run("schedules", _with_data(config or SchedulesConfig(), data), out, **kwargs)


def study_of(tree: xr.DataTree) -> Study:
    """The registered study that wrote `tree`, or `NotAStudyFile` saying why not."""
    name = tree.attrs.get("study")
    if name is None or "results" not in tree.children:
        raise NotAStudyFile("not a mcm_prob study result (no `study` attribute or /results group)")
    if name not in STUDIES:
        raise NotAStudyFile(
            f"written by study {name!r}, which is not registered here: {sorted(STUDIES)}"
        )
    return STUDIES[name]


def report(tree: xr.DataTree) -> str:
    """The summary table of a study's results (complete or partial), headed by the Gaussian
    path its times belong to."""
    study = study_of(tree)
    return f"{path_line(tree)}\n{study.report(tree)}"


def path_line(tree: xr.DataTree) -> str:
    """``path: SPEC (times in UNITS)`` from the file's config (files from before paths: OU)."""
    try:
        spec = json.loads(tree.attrs.get("config", "{}")).get("path", {"path": "ou"})
    except ValueError:
        spec = {"path": "ou"}
    try:
        units = paths.from_spec(spec).units
    except (TypeError, ValueError):
        units = spec.get("units", "?") if isinstance(spec, dict) else "?"
    return f"path: {json.dumps(spec)} (times in {units})"


def plot(tree: xr.DataTree):
    """The study's figure (a matplotlib Figure)."""
    return study_of(tree).plot(tree)
