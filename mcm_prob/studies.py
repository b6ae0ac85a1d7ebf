r"""Error studies: estimation error versus the discretization step, and sampling KL versus steps.

Both studies return an `xarray.DataTree` and write it as they go: every finished cell is saved
(atomically) to the output file together with a `done` mask, so an interrupted study resumes
from its partial file without redoing finished cells (`resume=True`; a different config is
refused). A finished file holds:

* `/results`: the measurements, with named dims, coordinates with units and `long_name`s;
* `/bootstrap`, `/posterior`, `/posterior/diagnostics` (estimation study): the rate analysis
  of `mcm_prob.statistics` on the mean consistency error;
* global provenance attrs (versions, config JSON, seeds, dtype, device, timestamp, wall time).

**Estimation study.** For each regime (smooth: a 2-d Gaussian mixture with PD covariances;
non-smooth: a 2-d Dirac mixture with early stopping at `delta_nonsmooth`), each step Delta and
each seed, a consistency net is fitted (all seeds of a step in one compiled program) and we
record on (t, s) pairs that lie on every Delta grid: the consistency error against the exact
flow; the teacher's own error (its composed Delta-steps against the exact flow, no learning:
the discretization part) and the learning error (against the composed teacher map, which is
what CD targets); and the quality of the multi-step sampler driven by the learned net (k-NN KL
estimate against the exact $p_\delta$ and energy distance to exact samples, with standard
errors), next to the same estimates for the exact flow (the estimator's own floor).

**Sampling study.** Exact KL of the multi-step sampler with the exact flow versus steps, dim
and tau (Gaussian data: exact Gaussian laws; uniform box: exact 1-d grid laws summed over
coordinates), the exact KL of the fixed-step diffusion baselines on the Gaussian data, and
steps-to-eps tables for all of them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import tomllib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr
from tqdm.auto import tqdm

from . import metrics
from .accuracy import kl_of_steps, steps_to_accuracy
from .data import DiracMixture, Gaussian, GaussianMixture, UniformBox
from .diffusion import BASELINES
from .flow import ExactFlow
from .gridlaw import grid_law_1d
from .results import load_tree, provenance, save_tree
from .sampling import sample
from .statistics import bootstrap_rates, posterior_rates
from .training import TrainConfig, fit_grid, teacher_map

__all__ = [
    "EstimationConfig",
    "SamplingConfig",
    "run_estimation",
    "run_sampling",
    "load_config",
    "StudyExists",
    "estimation_data",
    "sampling_gaussian",
]

TIME_UNITS = "OU time (dX = -X dt + sqrt(2) dB)"


class StudyExists(FileExistsError):
    """The output file exists and neither resume nor overwrite was asked for."""


def _validate(cfg, ints=(), positive=(), choices=None) -> None:
    for name in ints:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"config key `{name}` must be an integer >= 1, got {v!r}")
    for name in positive:
        v = getattr(cfg, name)
        if (
            isinstance(v, bool)
            or not isinstance(v, (int, float))
            or not (math.isfinite(v) and v > 0)
        ):
            raise ValueError(f"config key `{name}` must be a finite number > 0, got {v!r}")
    for name, options in (choices or {}).items():
        if getattr(cfg, name) not in options:
            raise ValueError(
                f"config key `{name}` must be one of {options}, got {getattr(cfg, name)!r}"
            )


def _tuple(cfg, name, kind):
    value = getattr(cfg, name)
    try:
        items = tuple(kind(v) for v in value)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"config key `{name}` must be a list of {kind.__name__}s, got {value!r}"
        ) from err
    if not items or len(set(items)) != len(items):
        raise ValueError(
            f"config key `{name}` must be a non-empty list without repeats, got {value!r}"
        )
    object.__setattr__(cfg, name, items)


@dataclasses.dataclass(frozen=True)
class EstimationConfig:
    """Settings of the estimation study (TOML table ``[estimation]``; see `run_estimation`)."""

    regimes: tuple = ("smooth", "nonsmooth")
    steps: tuple = (0.025, 0.05, 0.1, 0.2, 0.4)
    seeds: tuple = tuple(range(8))
    method: str = "cd"
    teacher: str = "euler"
    iterations: int = 6000
    batch_size: int = 256
    width: int = 64
    depth: int = 2
    learning_rate: float = 1e-3
    delta_smooth: float = 0.01
    delta_nonsmooth: float = 0.05
    eval_samples: int = 2048
    sample_size: int = 2000
    sampler_steps: int = 4
    sampler_tau: float = 0.0
    n_boot: int = 2000
    chains: int = 4
    warmup: int = 500
    draws: int = 1000
    ci: float = 0.9
    seed: int = 0

    def __post_init__(self):
        _tuple(self, "regimes", str)
        _tuple(self, "steps", float)
        _tuple(self, "seeds", int)
        bad = set(self.regimes) - {"smooth", "nonsmooth"}
        if bad:
            raise ValueError(
                f"config key `regimes` accepts 'smooth' and 'nonsmooth', got {sorted(bad)}"
            )
        _validate(
            self,
            ints=(
                "iterations",
                "batch_size",
                "width",
                "eval_samples",
                "sample_size",
                "sampler_steps",
                "n_boot",
                "chains",
                "warmup",
                "draws",
            ),
            positive=("learning_rate", "delta_smooth", "delta_nonsmooth"),
            choices={"method": ("cd", "ct"), "teacher": ("euler", "heun", "exact")},
        )
        base = max(self.steps)
        if min(self.steps) <= 0 or any(abs(base / v - round(base / v)) > 1e-9 for v in self.steps):
            raise ValueError(
                f"config key `steps` must be positive and divide the largest step {base} (so that the "
                f"evaluation pairs lie on every grid), got {self.steps}"
            )
        if len(self.steps) < 2 or len(self.seeds) < 2:
            raise ValueError(
                "config keys `steps` and `seeds` need at least 2 values each (a rate needs them)"
            )
        if not 0 < self.ci < 1:
            raise ValueError(f"config key `ci` must be in (0, 1), got {self.ci!r}")
        if not self.sampler_tau >= 0:
            raise ValueError(f"config key `sampler_tau` must be >= 0, got {self.sampler_tau!r}")

    @property
    def horizon(self) -> float:
        """T - delta = 8 x the largest step: training grids and evaluation pairs share it."""
        return 8 * max(self.steps)

    def delta(self, regime: str) -> float:
        return self.delta_smooth if regime == "smooth" else self.delta_nonsmooth

    def pairs(self, regime: str) -> list[tuple[float, float]]:
        """(t, s) pairs on every step's grid: t = delta + m b, s = delta + j b (b = largest step)."""
        d, b = self.delta(regime), max(self.steps)
        return [(d + m * b, d + j * b) for m in (1, 2, 4, 8) for j in sorted({0, m // 2}) if j < m]

    def train_config(self, regime: str) -> TrainConfig:
        return TrainConfig(
            method=self.method,
            teacher=self.teacher,
            step=max(self.steps),
            T=self.delta(regime) + self.horizon,
            delta=self.delta(regime),
            iterations=self.iterations,
            batch_size=self.batch_size,
            width=self.width,
            depth=self.depth,
            learning_rate=self.learning_rate,
            chunk_size=max(1, self.iterations // 20),
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


QUICK_ESTIMATION = dict(
    steps=(0.1, 0.2, 0.4),
    seeds=(0, 1, 2, 3),
    iterations=300,
    width=32,
    batch_size=128,
    eval_samples=512,
    sample_size=500,
    n_boot=500,
    warmup=300,
    draws=400,
)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Settings of the sampling study (TOML table ``[sampling]``; see `run_sampling`)."""

    dims: tuple = (1, 2, 4, 8)
    max_steps: int = 12
    h: float = 0.5
    taus: tuple = (0.0, 0.5, math.inf)
    delta: float = 0.01
    delta_box: float = 0.05
    T: float = 8.0
    baselines: tuple = ("sde_euler_maruyama", "sde_exponential", "ode_euler", "ode_heun")
    baseline_steps: tuple = (4, 8, 16, 32, 64, 128, 256)
    eps: tuple = (0.1, 0.03, 0.01)
    n_grid: int = 2001

    def __post_init__(self):
        _tuple(self, "dims", int)
        _tuple(self, "taus", float)
        _tuple(self, "baselines", str)
        _tuple(self, "baseline_steps", int)
        _tuple(self, "eps", float)
        _validate(self, ints=("max_steps", "n_grid"), positive=("h", "delta", "delta_box", "T"))
        bad = set(self.baselines) - set(BASELINES[:-1])
        if bad:
            raise ValueError(f"config key `baselines` accepts {BASELINES[:-1]}, got {sorted(bad)}")
        if (
            min(self.dims) < 1
            or min(self.baseline_steps) < 1
            or min(self.eps) <= 0
            or min(self.taus) < 0
        ):
            raise ValueError(
                "config keys `dims`, `baseline_steps` need values >= 1, `eps` > 0, `taus` >= 0"
            )
        if self.T <= self.delta:
            raise ValueError(f"config key `T` must exceed `delta` = {self.delta}, got {self.T}")

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["taus"] = [repr(t) if math.isinf(t) else t for t in self.taus]
        return json.dumps(d, sort_keys=True)


QUICK_SAMPLING = dict(
    dims=(1, 2, 4), max_steps=6, taus=(0.0, math.inf), baseline_steps=(4, 16, 64), n_grid=1001
)


def load_config(path: str | None, study: str, *, quick: bool = False):
    """Build the study config from a TOML file's ``[estimation]``/``[sampling]`` table (or the
    top level), `--quick` settings first and the file's keys on top. Unknown keys raise a
    `ValueError` listing the valid ones, before any computation."""
    cls = {"estimation": EstimationConfig, "sampling": SamplingConfig}[study]
    values = dict(QUICK_ESTIMATION if study == "estimation" else QUICK_SAMPLING) if quick else {}
    if path is not None:
        with open(path, "rb") as fh:
            try:
                raw = tomllib.load(fh)
            except tomllib.TOMLDecodeError as err:
                raise ValueError(f"config file {path} is not valid TOML: {err}") from err
        table = raw.get(study, {k: v for k, v in raw.items() if not isinstance(v, dict)})
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(table) - set(valid))
        if unknown:
            raise ValueError(
                f"unknown config key(s) {unknown} for the {study} study; valid keys: {valid}"
            )
        values |= table
    return cls(**values)


# ------------------------------------------------------------------ common machinery
def _open(out: Path, config_json: str, resume: bool, overwrite: bool):
    if out.exists():
        if overwrite:
            return None
        if not resume:
            raise StudyExists(
                f"{out} exists: pass --resume to continue it (same config) or --overwrite to replace it"
            )
        tree = load_tree(out)
        if tree.attrs.get("config") != config_json:
            raise ValueError(
                f"{out} was written with a different config; cannot resume. Its config: "
                f"{tree.attrs.get('config')}; this run's: {config_json}. Use --overwrite or another --out"
            )
        return tree
    if resume:
        raise FileNotFoundError(f"--resume given but {out} does not exist")
    return None


def _save(out: Path, groups: dict, attrs: dict) -> None:
    tree = xr.DataTree.from_dict(groups)
    tree.attrs = attrs
    save_tree(tree, out)


# ------------------------------------------------------------------ estimation
def estimation_data(regime: str):
    """The default 2-d data of each regime of the estimation study."""
    if regime == "smooth":
        return GaussianMixture(
            [0.5, 0.5], [[-1.5, 0.0], [1.5, 0.5]], [np.diag([0.3, 0.5]), np.diag([0.5, 0.3])]
        )
    return DiracMixture([[-1.5, -1.0], [1.5, -1.0], [0.0, 1.2], [1.0, 1.5]])


def _empty_estimation(cfg: EstimationConfig) -> xr.Dataset:
    r, st, sd, npair = len(cfg.regimes), len(cfg.steps), len(cfg.seeds), len(cfg.pairs("smooth"))
    nan = lambda *shape: np.full(shape, np.nan)  # noqa: E731
    rss, rs = ("regime", "step", "seed"), ("regime", "step")
    sq = "squared distance (data units^2)"
    ds = xr.Dataset(
        {
            "consistency_error": (
                rss + ("pair",),
                nan(r, st, sd, npair),
                {"long_name": "E_{p_t} ||f(x,t,s) - Phi_{t->s}(x)||^2", "units": sq},
            ),
            "consistency_error_mean": (
                rss,
                nan(r, st, sd),
                {"long_name": "consistency error averaged over (t, s) pairs", "units": sq},
            ),
            "learning_error": (
                rss + ("pair",),
                nan(r, st, sd, npair),
                {"long_name": "E ||f(x,t,s) - teacher map(x)||^2 (learning part)", "units": sq},
            ),
            "learning_error_mean": (
                rss,
                nan(r, st, sd),
                {"long_name": "learning error averaged over pairs", "units": sq},
            ),
            "teacher_error": (
                rs + ("pair",),
                nan(r, st, npair),
                {
                    "long_name": "E ||teacher map(x) - Phi(x)||^2 (discretization part, no learning)",
                    "units": sq,
                },
            ),
            "teacher_error_mean": (
                rs,
                nan(r, st),
                {"long_name": "teacher error averaged over pairs", "units": sq},
            ),
            "kl_estimate": (
                rss,
                nan(r, st, sd),
                {
                    "long_name": "k-NN estimate of KL(sampler law || p_delta), learned net",
                    "units": "nats",
                },
            ),
            "kl_stderr": (
                rss,
                nan(r, st, sd),
                {"long_name": "standard error of kl_estimate", "units": "nats"},
            ),
            "energy_distance": (
                rss,
                nan(r, st, sd),
                {"long_name": "energy distance to exact samples of p_delta", "units": "data units"},
            ),
            "energy_stderr": (
                rss,
                nan(r, st, sd),
                {"long_name": "jackknife standard error of energy_distance", "units": "data units"},
            ),
            "kl_estimate_exact_flow": (
                "regime",
                nan(r),
                {
                    "long_name": "k-NN KL estimate for the sampler with the exact flow (estimator floor)",
                    "units": "nats",
                },
            ),
            "kl_stderr_exact_flow": (
                "regime",
                nan(r),
                {"long_name": "standard error of kl_estimate_exact_flow", "units": "nats"},
            ),
            "energy_distance_exact_flow": (
                "regime",
                nan(r),
                {"long_name": "energy distance for the exact-flow sampler", "units": "data units"},
            ),
            "final_loss": (
                rss,
                nan(r, st, sd),
                {"long_name": "mean training loss over the last 10% of iterations"},
            ),
            "failed": (
                rss,
                np.zeros((r, st, sd), bool),
                {"long_name": "training diverged (non-finite loss)"},
            ),
            "done": (rs, np.zeros((r, st), bool), {"long_name": "cell finished and saved"}),
            "cell_wall_time": (
                rs,
                nan(r, st),
                {"long_name": "wall time of the cell", "units": "s"},
            ),
        },
        coords={
            "regime": ("regime", list(cfg.regimes), {"long_name": "data regime"}),
            "step": (
                "step",
                np.array(cfg.steps),
                {"long_name": "discretization step Delta", "units": TIME_UNITS},
            ),
            "seed": ("seed", np.array(cfg.seeds), {"long_name": "training seed"}),
            "pair": ("pair", np.arange(npair), {"long_name": "(t, s) evaluation pair"}),
            "t": (
                ("regime", "pair"),
                np.array([[p[0] for p in cfg.pairs(g)] for g in cfg.regimes]),
                {"long_name": "start time t", "units": TIME_UNITS},
            ),
            "s": (
                ("regime", "pair"),
                np.array([[p[1] for p in cfg.pairs(g)] for g in cfg.regimes]),
                {"long_name": "target time s", "units": TIME_UNITS},
            ),
            "delta": (
                "regime",
                np.array([cfg.delta(g) for g in cfg.regimes]),
                {"long_name": "early-stopping time", "units": TIME_UNITS},
            ),
        },
    )
    return ds


def _sample_quality(f, data, cfg: EstimationConfig, regime: str, key):
    delta = cfg.delta(regime)
    h = cfg.horizon / cfg.sampler_steps
    k1, k2 = jax.random.split(key)
    x = sample(
        f,
        k1,
        cfg.sample_size,
        dim=data.dim,
        delta=delta,
        h=h,
        steps=cfg.sampler_steps,
        tau=cfg.sampler_tau,
    ).samples
    target = data.marginal(delta)
    kl = metrics.kl_knn(np.asarray(x, np.float64), target.log_prob)
    ref = target.sample(k2, (cfg.sample_size,))
    en = metrics.energy_distance(np.asarray(x, np.float64), np.asarray(ref))
    return kl, en


def _estimation_cell(ds, cfg, regime, i_step, reference, teacher_refs, data, key, progress):
    r = cfg.regimes.index(regime)
    step = cfg.steps[i_step]
    start = time.perf_counter()
    tcfg = dataclasses.replace(cfg.train_config(regime), progress=progress)
    grid, history = fit_grid(data, tcfg, steps=[step], seeds=list(cfg.seeds))
    pairs = cfg.pairs(regime)
    failed = history["failed_at"][0] >= 0
    ce = metrics.consistency_error(grid, data, pairs, key=key, reference=reference)
    ds["consistency_error"][r, i_step] = np.where(failed[:, None], np.nan, ce.per_pair[0])
    ds["consistency_error_mean"][r, i_step] = np.where(failed, np.nan, ce.mean[0])
    if teacher_refs is not None:
        teach = teacher_refs[i_step]
        le = metrics.consistency_error(
            grid,
            data,
            pairs,
            key=key,
            reference=[(x, y) for (x, _), y in zip(reference, teach, strict=True)],
        )
        ds["learning_error"][r, i_step] = np.where(failed[:, None], np.nan, le.per_pair[0])
        ds["learning_error_mean"][r, i_step] = np.where(failed, np.nan, le.mean[0])
        te = metrics.consistency_error(
            lambda x, t, s: x,
            data,
            pairs,
            key=key,
            reference=[(y, z) for y, (_, z) in zip(teach, reference, strict=True)],
        )
        ds["teacher_error"][r, i_step] = te.per_pair
        ds["teacher_error_mean"][r, i_step] = te.mean
    tail = max(1, cfg.iterations // 10)
    ds["final_loss"][r, i_step] = np.nanmean(history["loss"][0, :, -tail:], axis=-1)
    ds["failed"][r, i_step] = failed
    for j in range(len(cfg.seeds)):
        if failed[j]:
            continue
        kl, en = _sample_quality(grid[0, j], data, cfg, regime, jax.random.fold_in(key, 1000 + j))
        ds["kl_estimate"][r, i_step, j], ds["kl_stderr"][r, i_step, j] = kl
        ds["energy_distance"][r, i_step, j], ds["energy_stderr"][r, i_step, j] = en
    ds["cell_wall_time"][r, i_step] = time.perf_counter() - start
    ds["done"][r, i_step] = True


def _rate_analysis(ds: xr.Dataset, cfg: EstimationConfig) -> dict:
    err = ds["consistency_error_mean"]
    complete = ~err.isnull().any(("regime", "step"))
    err = err.sel(seed=complete.values)
    boot = bootstrap_rates(err, n_boot=cfg.n_boot, ci=cfg.ci, seed=cfg.seed)
    boot.attrs["seeds_used"] = json.dumps([int(s) for s in err["seed"].values])
    post, summary = posterior_rates(
        err, chains=cfg.chains, warmup=cfg.warmup, samples=cfg.draws, seed=cfg.seed, ci=cfg.ci
    )
    return {"/bootstrap": boot, "/posterior": post, "/posterior/diagnostics": summary}


def run_estimation(
    config: EstimationConfig,
    out: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
) -> xr.DataTree:
    """Run (or resume) the estimation study, writing `out` after every finished cell.

    `stop_after`: stop after that many newly finished cells (for tests of interruption); the
    file then holds a partial study that `resume=True` completes.
    """
    out = Path(out)
    cfg_json = config.to_json()
    previous = _open(out, cfg_json, resume, overwrite)
    start = time.perf_counter()
    ds = _empty_estimation(config) if previous is None else previous["results"].to_dataset()
    elapsed = 0.0 if previous is None else float(previous.attrs.get("wall_time_s", 0.0))
    key = jax.random.key(config.seed)
    dtype = str(jnp.result_type(float))

    def attrs():
        a = provenance(
            config_json=cfg_json,
            seeds=config.seeds,
            dtype=f"training float32; ground truth {dtype}",
            wall_time=elapsed + time.perf_counter() - start,
            study="estimation",
        )
        a["status"] = "complete" if bool(ds["done"].all()) else "partial"
        return a

    newly = 0
    cells = [(g, i) for g in config.regimes for i in range(len(config.steps))]
    todo = [(g, i) for g, i in cells if not bool(ds["done"].sel(regime=g).values[i])]
    with tqdm(
        total=len(cells),
        initial=len(cells) - len(todo),
        desc="estimation cells",
        disable=not progress,
    ) as bar:
        for regime in config.regimes:
            mine = [i for g, i in todo if g == regime]
            if not mine:
                continue
            data = estimation_data(regime)
            rkey = jax.random.fold_in(key, config.regimes.index(regime))
            reference = metrics.reference_flows(
                data, config.pairs(regime), key=rkey, n=config.eval_samples
            )
            teacher_refs = None
            if config.method == "cd":
                teacher_refs = {
                    i: [
                        teacher_map(data, x, t, s, step=config.steps[i], teacher=config.teacher)
                        for (x, _), (t, s) in zip(reference, config.pairs(regime), strict=True)
                    ]
                    for i in mine
                }
            r = config.regimes.index(regime)
            if np.isnan(ds["kl_estimate_exact_flow"].values[r]):
                kl, en = _sample_quality(
                    ExactFlow(data, rtol=1e-8, atol=1e-8),
                    data,
                    config,
                    regime,
                    jax.random.fold_in(rkey, 999),
                )
                ds["kl_estimate_exact_flow"][r], ds["kl_stderr_exact_flow"][r] = kl
                ds["energy_distance_exact_flow"][r] = en.value
            for i in mine:
                _estimation_cell(
                    ds, config, regime, i, reference, teacher_refs, data, rkey, progress
                )
                _save(out, {"/results": ds}, attrs())
                bar.update(1)
                newly += 1
                if stop_after is not None and newly >= stop_after and not bool(ds["done"].all()):
                    return load_tree(out)
    groups = {"/results": ds} | _rate_analysis(ds, config)
    _save(out, groups, attrs())
    return load_tree(out)


# ------------------------------------------------------------------ sampling
def sampling_gaussian(dim: int) -> Gaussian:
    """The Gaussian of the sampling study in dimension d: mean 0.5, variances from 0.5 to 2."""
    return Gaussian(np.full(dim, 0.5), np.diag(np.linspace(0.5, 2.0, dim)))


def run_sampling(
    config: SamplingConfig,
    out: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
) -> xr.DataTree:
    """Run (or resume) the sampling study (exact laws, no training), writing `out` per cell.

    Cells: one per dimension for the Gaussian data (consistency sampler and baselines), and one
    for the box (its 1-d grid laws give every dimension: KL_d = d KL_1 for the cube [-1, 1]^d).
    """
    out = Path(out)
    cfg_json = config.to_json()
    previous = _open(out, cfg_json, resume, overwrite)
    start = time.perf_counter()
    c = config
    steps = np.arange(1, c.max_steps + 1)
    regimes = ["smooth", "nonsmooth"]
    if previous is None:
        nan = lambda *shape: np.full(shape, np.nan)  # noqa: E731
        ds = xr.Dataset(
            {
                "kl": (
                    ("regime", "dim", "tau", "steps"),
                    nan(2, len(c.dims), len(c.taus), len(steps)),
                    {"long_name": "exact KL(sampler law || p_delta), exact flow", "units": "nats"},
                ),
                "kl_baseline": (
                    ("baseline", "dim", "baseline_steps"),
                    nan(len(c.baselines), len(c.dims), len(c.baseline_steps)),
                    {
                        "long_name": "exact KL(baseline law || p_delta), Gaussian data",
                        "units": "nats",
                    },
                ),
                "steps_to_eps": (
                    ("regime", "dim", "tau", "eps"),
                    nan(2, len(c.dims), len(c.taus), len(c.eps)),
                    {"long_name": "smallest steps with KL <= eps^2 (NaN: more than max_steps)"},
                ),
                "nfe_to_eps_baseline": (
                    ("baseline", "dim", "eps"),
                    nan(len(c.baselines), len(c.dims), len(c.eps)),
                    {"long_name": "smallest NFE with KL <= eps^2 (NaN: more than 4096 steps)"},
                ),
                "done_gaussian": (
                    "dim",
                    np.zeros(len(c.dims), bool),
                    {"long_name": "Gaussian cell finished"},
                ),
                "done_box": ((), False, {"long_name": "box cell finished"}),
            },
            coords={
                "regime": (
                    "regime",
                    regimes,
                    {
                        "long_name": "smooth: Gaussian N(0.5, diag(0.5..2)); nonsmooth: uniform on [-1, 1]^d"
                    },
                ),
                "dim": ("dim", np.array(c.dims), {"long_name": "data dimension d"}),
                "tau": (
                    "tau",
                    np.array(c.taus),
                    {
                        "long_name": "re-noising length tau (inf: Song et al. Algorithm 1)",
                        "units": TIME_UNITS,
                    },
                ),
                "steps": ("steps", steps, {"long_name": "sampler steps K (NFE)"}),
                "baseline": (
                    "baseline",
                    list(c.baselines),
                    {"long_name": "diffusion baseline with the exact score"},
                ),
                "baseline_steps": (
                    "baseline_steps",
                    np.array(c.baseline_steps),
                    {"long_name": "baseline steps"},
                ),
                "eps": ("eps", np.array(c.eps), {"long_name": "target accuracy: KL <= eps^2"}),
            },
            attrs={
                "h": c.h,
                "delta": c.delta,
                "delta_box": c.delta_box,
                "T_baselines": c.T,
                "note": "nonsmooth KL values come from 1-d grid laws: values below about 1e-9 are at the quadrature floor",
            },
        )
        elapsed = 0.0
    else:
        ds = previous["results"].to_dataset()
        elapsed = float(previous.attrs.get("wall_time_s", 0.0))

    def attrs():
        done = bool(ds["done_gaussian"].all()) and bool(ds["done_box"])
        a = provenance(
            config_json=cfg_json,
            seeds=[],
            dtype=str(jnp.result_type(float)),
            wall_time=elapsed + time.perf_counter() - start,
            study="sampling",
        )
        a["status"] = "complete" if done else "partial"
        return a

    def eps_table(kl_row):  # kl_row over steps -> smallest K per eps
        return [
            next((int(k) for k, v in zip(steps, kl_row, strict=True) if v <= e**2), np.nan)
            for e in c.eps
        ]

    newly = 0
    total = len(c.dims) + 1
    done0 = int(ds["done_gaussian"].sum()) + int(bool(ds["done_box"]))
    with tqdm(total=total, initial=done0, desc="sampling cells", disable=not progress) as bar:
        for i, d in enumerate(c.dims):
            if bool(ds["done_gaussian"][i]):
                continue
            data = sampling_gaussian(d)
            for j, tau in enumerate(c.taus):
                kl = kl_of_steps(data, delta=c.delta, h=c.h, tau=tau)
                row = [kl(int(k)) for k in steps]
                ds["kl"][0, i, j] = row
                ds["steps_to_eps"][0, i, j] = eps_table(row)
            for m, method in enumerate(c.baselines):
                kl = kl_of_steps(data, sampler=method, delta=c.delta, T=c.T)
                ds["kl_baseline"][m, i] = [kl(int(k)) for k in c.baseline_steps]
                ds["nfe_to_eps_baseline"][m, i] = [
                    np.nan
                    if (r := steps_to_accuracy(data, e, sampler=method, delta=c.delta, T=c.T))[
                        "nfe"
                    ]
                    is None
                    else r["nfe"]
                    for e in c.eps
                ]
            ds["done_gaussian"][i] = True
            _save(out, {"/results": ds}, attrs())
            bar.update(1)
            newly += 1
            if stop_after is not None and newly >= stop_after:
                return load_tree(out)
        if not bool(ds["done_box"]):
            factor = UniformBox([-1.0], [1.0])
            for j, tau in enumerate(c.taus):
                kl1 = np.array(
                    [
                        grid_law_1d(
                            factor, delta=c.delta_box, h=c.h, steps=int(k), tau=tau, n_grid=c.n_grid
                        ).kl
                        for k in steps
                    ]
                )
                for i, d in enumerate(c.dims):
                    ds["kl"][1, i, j] = d * kl1
                    ds["steps_to_eps"][1, i, j] = eps_table(d * kl1)
            ds["done_box"][()] = True
            bar.update(1)
    _save(out, {"/results": ds}, attrs())
    return load_tree(out)
