r"""Estimation study: consistency error versus the discretization step, on the user's data.

Grid: data entry (label -> spec or distribution; its regime comes from the distribution) x
fitting method `fit_method` (``cd-euler``, ``cd-heun``, ``cd-exact``, ``ct``) x training-set size
`train_size` (inf = fresh draws every iteration) x training `budget` (iterations) x step
Delta x seed. One cell = (entry, fit_method, train_size): the whole (step x seed) grid in one
compiled program (sharded over the local devices), snapshots of the weights at every budget
(constant learning rate: a snapshot at k is the k-iteration fit), evaluated by compiled
programs over all its models. Recorded on (t, s) pairs that lie on every Delta grid: the consistency
error against the exact flow; the teacher's own error (its composed Delta-steps against the
exact flow, no learning: the discretization part) and the learning error (against the composed
teacher map, which is what CD targets); at the largest budget the quality of the multi-step
sampler driven by the learned net (k-NN KL estimate against the exact $p_\delta$ and energy
distance, with standard errors), next to the exact flow's (the estimator's floor); for 1-d
entries also the sampler law's exact KL from the grid law of the learned net
(`mcm_prob.gridlaw.grid_law_1d` with f = the net), which has no estimator floor.

Analysis (`finalize`, `mcm_prob.statistics`): per group (entry, fit_method, train_size, budget), a
bootstrap over seeds and the three checked error models of `mcm_prob.error_models` fitted to
the consistency error, compared by PSIS-LOO; a rate, Delta* or minimal error is reported only
from a usable model (predictive check passed, diagnostics clean), the preferred one by LOO.
Also the teacher's order (least-squares log-log slope of its error, next to the theory: 2 for
Euler and 4 for Heun in squared distance) and the learning error at the smallest step against
budget and against n. Groups: ``/bootstrap``, ``/error_models/<model>`` (ArviZ layout),
``/model_comparison``, ``/summary``, ``/budget``, ``/train_size``.

Default (the main job): a smooth 2-d Gaussian mixture and a non-smooth 2-d Dirac mixture,
CD with the Euler teacher (`TrainConfig`'s default teacher too), budgets 1500, 3000 and 6000
iterations.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Mapping

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr

from .. import metrics
from .._checks import check_size, distinct, integer, number, seeds
from ..data import DiracMixture
from ..datasets import image_shape
from ..devices import rows_over_processes
from ..error_models import (
    ALIASES,
    ERROR_MODELS,
    PPC_ALPHA,
    curve_quantiles,
    fit_error_models,
    model_name,
)
from ..flow import ExactFlow
from ..gridlaw import grid_law_1d, law_grid
from ..progress import status
from ..sampling import sample, sample_grid
from ..schedules import Schedule
from ..statistics import bootstrap_rates, compare_error_models, loglog_slope
from ..training import (
    OBJECTIVES,
    FittedGrid,
    TrainConfig,
    fit_grid,
    objective_from_spec,
    teacher_map,
)
from .driver import N_IMAGES, Study, StudyConfig, image_entries, image_variables

__all__ = ["EstimationConfig", "EstimationStudy", "DEFAULT_DATA", "DEFAULT_TRAIN", "METHODS"]

DEFAULT_DATA = {
    "smooth": {
        "family": "gaussian_mixture",
        "weights": [0.5, 0.5],
        "means": [[-1.5, 0.0], [1.5, 0.5]],
        "covs": [[[0.3, 0.0], [0.0, 0.5]], [[0.5, 0.0], [0.0, 0.3]]],
    },
    "nonsmooth": {
        "family": "dirac_mixture",
        "atoms": [[-1.5, -1.0], [1.5, -1.0], [0.0, 1.2], [1.0, 1.5]],
        "weights": [0.25, 0.25, 0.25, 0.25],
    },
}
DEFAULT_TRAIN = dict(
    method="cd", teacher="euler", batch_size=256, width=64, depth=2, learning_rate=1e-3
)
# fitting methods through TrainConfig: label -> (TrainConfig.method, teacher or None); every
# other label of mcm_prob.training.OBJECTIVES (or a table naming one) is fitted as that objective
# with the loop, network and optimiser settings of `train`
METHODS = {
    "cd-euler": ("cd", "euler"),
    "cd-heun": ("cd", "heun"),
    "cd-exact": ("cd", "exact"),
    "ct": ("ct", None),
}
# the teacher's order of convergence in squared distance (the exact teacher has none)
TEACHER_ORDER = {"euler": 2.0, "heun": 4.0}
# TrainConfig fields that the study sets per cell
_STUDY_SET = ("step", "T", "delta", "iterations", "train_size", "chunk_size", "progress", "path")


def _train_config(train) -> TrainConfig:
    if isinstance(train, TrainConfig):
        return train
    if not isinstance(train, Mapping):
        raise ValueError(f"config key `train` must be a table of TrainConfig keys, got {train!r}")
    valid = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in _STUDY_SET]
    unknown = sorted(set(train) - set(valid))
    if unknown:
        set_here = sorted(set(unknown) & set(_STUDY_SET))
        raise ValueError(
            f"unknown config key(s) {unknown} in `train`"
            + (
                f" ({set_here} are set by the study: use `budgets` for iterations, "
                "`train_sizes` for train_size and the study's `path` for the path)"
                if set_here
                else ""
            )
            + f"; valid keys: {valid}"
        )
    return TrainConfig(**(DEFAULT_TRAIN | dict(train)))


def _method_label(cfg: TrainConfig) -> str:
    return "ct" if cfg.method == "ct" else f"cd-{cfg.teacher}"


def _method_spec(name: str, v):
    """A `methods` entry: a label of METHODS (the TrainConfig route) or of
    mcm_prob.training.OBJECTIVES, or a table {objective = label, label = ..., arguments}."""
    if isinstance(v, str) and v in METHODS:
        return v
    try:
        objective_from_spec(v)
    except ValueError as err:
        labels = sorted(set(METHODS) | set(OBJECTIVES))
        raise ValueError(
            f"`{name}` must be one of {labels} or a table {{objective = label, label = ..., "
            f"arguments}}, got {v!r} ({err})"
        ) from None
    return dict(v) if isinstance(v, Mapping) else v


def _method_label_of(spec) -> str:
    return spec if isinstance(spec, str) else objective_from_spec(spec)[0]


def _train_size(name: str, v) -> float:
    if isinstance(v, float) and v == math.inf:
        return math.inf
    return float(integer(name, v, ge=1))


@dataclasses.dataclass(frozen=True)
class EstimationConfig(StudyConfig):
    """Settings of the estimation study (TOML table ``[estimation]``).

    - `data`: entries label -> data spec (with an optional ``delta``) or distribution object.
    - `train`: the training settings, the keys of `mcm_prob.TrainConfig` (table
      ``[estimation.train]``; `step`, `T`, `delta`, `iterations`, `train_size` are set by the
      study). Defaults: `DEFAULT_TRAIN`, the other keys as in `TrainConfig`.
    - `methods`: fitting methods side by side: labels of `METHODS` (CD and CT through
      `train`) or of `mcm_prob.training.OBJECTIVES` (sCM, MeanFlow, shortcut, flow map
      matching, ...), or tables ``{objective = label, label = ..., arguments}``; every method
      gets the same network, optimiser, iterations and batch (`train`). Continuous-time
      objectives are trained once per seed and stored at step = 0 (the `step` axis then
      starts at 0); empty: the one in `train`.
    - `budgets`: training iterations at which every model is evaluated (snapshots of one run).
    - `train_sizes`: training-set sizes n (integers; ``inf`` = fresh draws every iteration).
    - `steps` (each dividing the largest), `seeds`: the (Delta, seed) grid.
    - `delta_smooth`, `delta_nonsmooth`: early-stopping time of entries without their own.
    - `eval_samples`: draws per (t, s) pair; `sample_size`, `sampler_steps`, `sampler_tau`:
      the multi-step sampler quality check (largest budget); `sampler_ks`: step counts K at
      which the check is repeated (constant step over the horizon; e.g. [1, 2, 4]: does
      sampling with more steps help or hurt each method?); `n_boot`, `error_models`,
      `chains`, `warmup`, `draws`, `refits`, `ci`, `seed`: the analysis (an error model
      that has not converged in some group has its chains continued to twice their length,
      at most `refits` times; see `fit_error_model`).
    """

    data: Mapping = dataclasses.field(default_factory=lambda: DEFAULT_DATA)
    train: Mapping | TrainConfig = dataclasses.field(default_factory=dict)
    methods: tuple = ()
    budgets: tuple = (1500, 3000, 6000)
    train_sizes: tuple = (math.inf,)
    steps: tuple = (0.025, 0.05, 0.1, 0.2, 0.4)
    seeds: tuple = tuple(range(8))
    delta_smooth: float = 0.01
    delta_nonsmooth: float = 0.05
    eval_samples: int = 2048
    sample_size: int = 2000
    sampler_steps: int = 4
    sampler_ks: tuple = ()
    sampler_tau: float = 0.0
    n_boot: int = 2000
    error_models: tuple = tuple(ERROR_MODELS)
    chains: int = 4
    warmup: int = 300
    draws: int = 600
    refits: int = 1
    ci: float = 0.9
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        train = _train_config(self.train)
        object.__setattr__(self, "train", train)
        methods = tuple(_method_spec(f"methods[{i}]", v) for i, v in enumerate(self.methods))
        object.__setattr__(self, "methods", methods or (_method_label(train),))
        distinct("methods", self.labels, lambda n, v: v)
        budgets = distinct("budgets", self.budgets, lambda n, v: integer(n, v, ge=1))
        object.__setattr__(self, "budgets", tuple(sorted(budgets)))
        if len(budgets) > 1 and train.lr_schedule != "constant":
            raise ValueError(
                "config key `budgets` with several budgets needs train.lr_schedule = "
                f"'constant' (budgets are snapshots of one run), got {train.lr_schedule!r}"
            )
        sizes = distinct("train_sizes", self.train_sizes, _train_size)
        object.__setattr__(self, "train_sizes", tuple(sorted(sizes)))
        steps = distinct("steps", self.steps, lambda n, v: number(n, v, gt=0), min_len=3)
        object.__setattr__(self, "steps", tuple(sorted(steps)))
        object.__setattr__(self, "seeds", seeds("seeds", self.seeds))
        if len(self.seeds) < 2:
            raise ValueError(
                f"config key `seeds` needs at least 2 seeds (a rate needs them), got {self.seeds}"
            )
        models = distinct("error_models", self.error_models, model_name)
        object.__setattr__(self, "error_models", models)
        for name in ("eval_samples", "sampler_steps", "warmup"):
            integer(name, getattr(self, name), ge=1)
        ks = distinct("sampler_ks", self.sampler_ks, lambda n, v: integer(n, v, ge=1), min_len=0)
        object.__setattr__(self, "sampler_ks", tuple(sorted(ks)))
        integer("chains", self.chains, ge=2)
        integer("draws", self.draws, ge=100)
        integer("refits", self.refits, ge=0, lt=5)
        integer("sample_size", self.sample_size, ge=10)
        integer("n_boot", self.n_boot, ge=100)
        self._check_sizes()
        integer("seed", self.seed, ge=0, lt=2**32)
        number("delta_smooth", self.delta_smooth, gt=0)
        number("delta_nonsmooth", self.delta_nonsmooth, gt=0)
        number("sampler_tau", self.sampler_tau, ge=0, allow_inf=True)
        number("ci", self.ci, gt=0, lt=1)
        base = max(steps)
        if any(abs(base / v - round(base / v)) > 1e-9 for v in steps):
            raise ValueError(
                f"config key `steps` must divide the largest step {base} (so that the "
                f"evaluation pairs lie on every grid), got {steps}"
            )
        for label in self.entries:
            top = self.entry_delta(label) + self.horizon
            if top > self.path.t_max:
                raise ValueError(
                    f"config key `steps`: the training horizon T = delta + 8 x the largest step "
                    f"= {top:g} (entry {label!r}) is beyond the {self.path.name} path's time range "
                    f"[0, {self.path.t_max:g}]; use a largest step <= (t_max - delta) / 8"
                )
            self.train_config(label, base, "cd-euler", self.train_sizes[0])

    def _check_sizes(self) -> None:
        """The resource guard on the keys that size one cell's arrays (`check_size`)."""
        dim = max(e.data.dim for e in self.entries.values())
        models = len(self.steps) * len(self.seeds)  # one cell's training program
        for name in ("eval_samples", "sample_size"):
            n = getattr(self, name)
            check_size(name, 4 * 8 * n * dim * models, f"{n} points x {models} models")
        groups = len(self.entries) * len(self.budgets) * max(len(self.methods), 1)
        groups *= len(self.train_sizes) * len(self.steps)
        check_size("n_boot", 8 * 4 * self.n_boot * groups, f"{self.n_boot} resamples")

    @property
    def labels(self) -> tuple[str, ...]:
        """The fitting methods' labels (the `fit_method` coordinate)."""
        return tuple(_method_label_of(m) for m in self.methods)

    def objective(self, m: int):
        """The objective of method m, or None for the TrainConfig route (CD, CT)."""
        spec = self.methods[m]
        if isinstance(spec, str) and spec in METHODS:
            return None
        return objective_from_spec(spec)[1]

    def continuous(self, m: int) -> bool:
        """Whether method m is a continuous-time objective (trained once, at Delta = 0)."""
        obj = self.objective(m)
        return obj is not None and not obj.has_step

    @property
    def step_axis(self) -> tuple[float, ...]:
        """The `step` coordinate: the steps, preceded by 0 (continuous-time objectives) when a
        method has no step."""
        zero = any(self.continuous(m) for m in range(len(self.methods)))
        return ((0.0,) if zero else ()) + tuple(self.steps)

    def fixed_point(self, m: int, step: float):
        """(teacher, teacher_step) of method m's fixed point at `step`, or None (exact flow)."""
        obj = self.objective(m)
        if obj is None:
            kind, teacher = METHODS[self.methods[m]]
            return None if kind == "ct" else (teacher, step)
        return obj.fixed_point(step)

    def settings(self, label: str, train_size: float):
        """The loop, network and optimiser settings of an objective method (from `train`)."""
        return self.train_config(label, max(self.steps), "cd-euler", train_size).fit_config()

    @property
    def horizon(self) -> float:
        """T - delta = 8 x the largest step: training grids and evaluation pairs share it."""
        return 8 * max(self.steps)

    def pairs(self, label: str) -> list[tuple[float, float]]:
        """(t, s) pairs on every step's grid: t = delta + m b, s = delta + j b (b = largest step)."""
        d, b = self.entry_delta(label), max(self.steps)
        return [(d + m * b, d + j * b) for m in (1, 2, 4, 8) for j in sorted({0, m // 2}) if j < m]

    def to_json(self) -> str:
        table = json.loads(super().to_json())
        for name in _STUDY_SET:  # set per cell, not by the user
            del table["train"][name]
        return json.dumps(table, sort_keys=True)

    def train_config(self, label: str, step: float, method: str, train_size: float) -> TrainConfig:
        kind, teacher = METHODS[method]
        iterations = max(self.budgets)
        return dataclasses.replace(
            self.train,
            method=kind,
            teacher=teacher or self.train.teacher,
            step=step,
            T=self.entry_delta(label) + self.horizon,
            delta=self.entry_delta(label),
            iterations=iterations,
            train_size=None if train_size == math.inf else int(train_size),
            chunk_size=max(1, math.gcd(iterations // 20, *self.budgets)),
            path=self.path,
        )


QUICK = dict(
    train=dict(width=32, batch_size=128),
    budgets=(150, 300),
    steps=(0.1, 0.2, 0.4),
    seeds=(0, 1, 2, 3),
    eval_samples=512,
    sample_size=500,
    n_boot=500,
    warmup=300,
    draws=300,
    refits=2,  # continuing the chains to 1200 draws is cheap (one compiled program)
)

_SQ = "squared distance (data units^2)"
_PROGRAM = ("entry", "fit_method", "train_size")  # one compiled training program: a cell
_CELL = _PROGRAM + ("step",)
_Q = _CELL + ("seed",)  # at the largest budget
_L = ("entry", "fit_method", "train_size", "budget", "step", "seed")
_T = ("entry", "fit_method", "step")
# name: (dims, long_name, units)
_VARIABLES = {
    "consistency_error": (_L + ("pair",), "E_{p_t} ||f(x,t,s) - Phi_{t->s}(x)||^2", _SQ),
    "consistency_error_mean": (_L, "consistency error averaged over (t, s) pairs", _SQ),
    "learning_error": (
        _L + ("pair",),
        "E ||f(x,t,s) - teacher map(x)||^2 (learning part; NaN without a teacher)",
        _SQ,
    ),
    "learning_error_mean": (_L, "learning error averaged over pairs", _SQ),
    "teacher_error": (
        _T + ("pair",),
        "E ||teacher map(x) - Phi(x)||^2 (discretization part, no learning)",
        _SQ,
    ),
    "teacher_error_mean": (_T, "teacher error averaged over pairs", _SQ),
    "kl_estimate": (_Q, "k-NN estimate of KL(sampler law || p_delta), learned net", "nats"),
    "kl_stderr": (_Q, "standard error of kl_estimate", "nats"),
    "kl_grid": (
        _Q,
        "exact KL(sampler law || p_delta) of the learned net, 1-d grid law "
        "(NaN: entry not 1-d, a net mixes coordinates, so product entries have no grid law; "
        "or not finite on the grid: the net's law has mass where p_delta underflows)",
        "nats",
    ),
    "energy_distance": (_Q, "energy distance to exact samples of p_delta", "data units"),
    "energy_stderr": (_Q, "jackknife standard error of energy_distance", "data units"),
    "kl_estimate_exact_flow": (
        ("entry",),
        "k-NN KL estimate for the sampler with the exact flow (estimator floor)",
        "nats",
    ),
    "kl_stderr_exact_flow": (("entry",), "standard error of kl_estimate_exact_flow", "nats"),
    "kl_grid_exact_flow": (
        ("entry",),
        "exact KL of the exact-flow sampler from the 1-d grid law (NaN: entry not 1-d)",
        "nats",
    ),
    "energy_distance_exact_flow": (
        ("entry",),
        "energy distance for the exact-flow sampler",
        "data units",
    ),
    "final_loss": (_Q, "mean training loss over the last 10% of iterations", None),
    "cell_wall_time": (_PROGRAM, "wall time of the cell (training and evaluation)", "s"),
    "seconds_per_iteration": (
        _PROGRAM,
        "training wall time per iteration of one model, compilation excluded (chunks after "
        "the first, divided by the models trained together)",
        "s",
    ),
}
# the sampler check repeated at K = sampler_ks steps (only when sampler_ks is set)
_K = _Q + ("sampler_k",)
_BY_K = {
    "kl_estimate_k": (
        _K,
        "k-NN estimate of KL(sampler law || p_delta) with K steps, learned net",
        "nats",
    ),
    "kl_stderr_k": (_K, "standard error of kl_estimate_k", "nats"),
    "kl_grid_k": (
        _K,
        "exact KL(sampler law || p_delta) with K steps, 1-d grid law (NaN: entry not 1-d, or not finite on the grid)",
        "nats",
    ),
    "energy_distance_k": (_K, "energy distance to exact samples of p_delta, K steps", "data units"),
    "kl_estimate_k_exact_flow": (
        ("entry", "sampler_k"),
        "k-NN KL estimate, exact-flow sampler with K steps",
        "nats",
    ),
    "kl_grid_k_exact_flow": (
        ("entry", "sampler_k"),
        "exact KL of the exact-flow sampler with K steps (1-d grid law)",
        "nats",
    ),
}


# entries whose points are images (`mcm_prob.datasets.image_shape`): the sampler's draws are
# kept for pictures, and for empirical measures (Dirac mixtures) their memorisation measured
_MEMO = (
    "mean distance of the sampler's draws to the nearest training image (atom) over the atoms' "
    "mean nearest-neighbour distance: ~1 new images, 0 copies (metrics.memorisation; NaN: "
    "entry not an empirical measure)"
)
_IMAGE_VARIABLES = {
    "memorisation": (_Q, _MEMO, None),
    "memorisation_stderr": (_Q, "standard error of memorisation", None),
    "memorisation_exact_flow": (("entry",), _MEMO + ", exact-flow sampler", None),
    "images": (
        ("entry", "fit_method", "image_k", "image", "pixel"),
        "first draws of the sampler with K steps (the method's smallest step, first seed, "
        "largest budget, last training-set size; NaN: entry not images, or pixels beyond its "
        "size)",
        "data units",
    ),
    "images_exact_flow": (
        ("entry", "image_k", "image", "pixel"),
        "first draws of the exact-flow sampler with K steps",
        "data units",
    ),
}
_IMAGE_BY_K = {
    "memorisation_k": (_K, _MEMO + ", K steps", None),
    "energy_distance_k_exact_flow": (
        ("entry", "sampler_k"),
        "energy distance to exact samples of p_delta, exact-flow sampler with K steps",
        "data units",
    ),
    "memorisation_k_exact_flow": (
        ("entry", "sampler_k"),
        _MEMO + ", exact-flow sampler, K steps",
        None,
    ),
}


def _has_images(cfg: EstimationConfig) -> bool:
    return any(image_shape(e.data) is not None for e in cfg.entries.values())


def _image_ks(cfg: EstimationConfig) -> tuple[int, ...]:
    """The step counts K whose draws are kept as pictures: `sampler_ks`, else `sampler_steps`."""
    return cfg.sampler_ks or (cfg.sampler_steps,)


def _atoms(data) -> np.ndarray | None:
    """The training images of an empirical measure of images (its atoms), against which
    draws' memorisation is measured; None for every other entry (no host copy made)."""
    if isinstance(data, DiracMixture) and image_shape(data) is not None:
        return np.asarray(data.atoms, np.float64)
    return None


def _select(grid: FittedGrid, i: int, n_steps: int) -> FittedGrid:
    """Rows i, i + n_steps, ... of a (budget x step, seed) grid: step i at every budget."""
    rows = slice(i, None, n_steps)
    models = jax.tree_util.tree_map(lambda a: a[rows] if eqx.is_array(a) else a, grid.models)
    return FittedGrid(models, grid.steps[rows], grid.seeds)


def _sampler_schedule(cfg: EstimationConfig, label: str, steps: int | None = None) -> Schedule:
    """Constant step over the horizon with `steps` (default `sampler_steps`) steps."""
    steps = cfg.sampler_steps if steps is None else steps
    return Schedule.constant(
        delta=cfg.entry_delta(label), h=cfg.horizon / steps, steps=steps, tau=cfg.sampler_tau
    )


def _grid_kl(f, data, cfg: EstimationConfig, label: str, steps: int | None, grid) -> float:
    """Exact KL of the sampler law with f (None: the exact flow) from the 1-d grid law on the
    entry's `grid` (`_law_grid`); NaN for entries that are not 1-d (grid None)."""
    if grid is None:
        return np.nan
    sched = _sampler_schedule(cfg, label, steps)
    try:
        return grid_law_1d(data, schedule=sched, f=f, grid=grid, path=cfg.path).kl
    except FloatingPointError:  # a learned map put mass where p_delta underflows on the grid
        return np.nan


def _law_grid(data, cfg: EstimationConfig, label: str) -> np.ndarray | None:
    """The grid of a 1-d entry's grid laws (2001 uniform points and the focus points), placed
    once for all its laws: every schedule ends at the entry's delta; None if not 1-d."""
    return (
        law_grid(data, _sampler_schedule(cfg, label), 2001, path=cfg.path)
        if data.dim == 1
        else None
    )


def _seed_keys(key, n_seeds: int) -> list:
    """The sampler-check key of each seed column (split into sampler and reference keys)."""
    return [jax.random.fold_in(key, 1000 + j) for j in range(n_seeds)]


def _reference_draws(data, cfg: EstimationConfig, label: str, key) -> np.ndarray:
    """`sample_size` exact draws of p_delta, the energy distance's reference."""
    target = data.marginal(cfg.entry_delta(label), cfg.path)
    return np.asarray(target.sample(jax.random.split(key)[1], (cfg.sample_size,)), np.float64)


def _quality(x: np.ndarray, ref: np.ndarray, data, cfg: EstimationConfig, label: str):
    """k-NN KL against the exact p_delta and energy distance to exact draws of it; sample
    sets (..., n, dim) with their references (..., m, dim) give arrays over ``...``, each
    estimator one compiled program over all of them."""
    target = data.marginal(cfg.entry_delta(label), cfg.path)
    log_p = jax.jit(target.log_prob)  # one compiled program, not one per eager operation
    return metrics.kl_knn(x, log_p), metrics.energy_distance(x, ref)


def _sample_quality(f, data, cfg: EstimationConfig, label: str, key, steps=None):
    """k-NN KL and energy distance of `sample_size` draws of the sampler with f, and the draws."""
    x = sample(
        f,
        jax.random.split(key)[0],
        cfg.sample_size,
        dim=data.dim,
        schedule=_sampler_schedule(cfg, label, steps),
        path=cfg.path,
    ).samples
    ref = _reference_draws(data, cfg, label, key)
    x = np.asarray(x, np.float64)
    return (*_quality(x, ref, data, cfg, label), x)


def _estimates(x, refs, ok, final, atoms, data, cfg: EstimationConfig, label: str, n_steps, grid):
    """k-NN KL, energy distance (`_quality`), grid-law KL (`_grid_kl`) and memorisation
    against `atoms` (None without them, `_atoms`) of the trained models' draws x (models, n,
    dim), model m being the grid's model ``final[ok[m]]``; spread over the processes of a
    multi-controller run (every process has every draw), each model's numbers the same."""

    def rows(m):
        kl, en = _quality(x[m], refs[ok[m, 1]], data, cfg, label)
        grid_kl = [_grid_kl(final[i, j], data, cfg, label, n_steps, grid) for i, j in ok[m]]
        memo = None if atoms is None else metrics.memorisation(x[m], atoms)
        return kl, en, np.array(grid_kl), memo

    return rows_over_processes(rows, len(ok))


def _keep_images(ds: xr.Dataset, name: str, where: dict, x: np.ndarray) -> None:
    """The first `N_IMAGES` draws of x (n, dim) into `name` at `where`."""
    ds[name][where | {"pixel": slice(0, x.shape[-1])}] = x[:N_IMAGES]


class EstimationStudy(Study):
    name = "estimation"
    config_type = EstimationConfig
    quick = QUICK
    nested = ("train",)
    analysis_keys = ("n_boot", "error_models", "chains", "warmup", "draws", "refits", "ci")

    def schema(self, cfg: EstimationConfig) -> xr.Dataset:
        labels = list(cfg.entries)
        sizes = {
            "entry": len(labels),
            "fit_method": len(cfg.methods),
            "train_size": len(cfg.train_sizes),
            "budget": len(cfg.budgets),
            "step": len(cfg.step_axis),
            "seed": len(cfg.seeds),
            "pair": len(cfg.pairs(labels[0])),
            "sampler_k": len(cfg.sampler_ks),
            "image_k": len(_image_ks(cfg)),
            "image": N_IMAGES,
            "pixel": max(e.data.dim for e in cfg.entries.values()),
        }
        data_vars = {}
        variables = _VARIABLES | (_BY_K if cfg.sampler_ks else {})
        if _has_images(cfg):
            variables |= _IMAGE_VARIABLES | (_IMAGE_BY_K if cfg.sampler_ks else {})
            data_vars |= image_variables(cfg.entries.values())
        for name, (dims, long_name, units) in variables.items():
            attrs = {"long_name": long_name} | ({} if units is None else {"units": units})
            data_vars[name] = (dims, np.full([sizes[d] for d in dims], np.nan), attrs)
        data_vars["failed"] = (
            _Q,
            np.zeros([sizes[d] for d in _Q], bool),
            {"long_name": "training diverged (non-finite loss)"},
        )
        data_vars["done"] = (
            _CELL,
            np.zeros([sizes[d] for d in _CELL], bool),
            {"long_name": "cell finished and saved"},
        )
        pairs = np.array([cfg.pairs(g) for g in labels])
        coords, specs = cfg.entry_coords()
        by_k = {}  # the K axes, where present
        if cfg.sampler_ks:
            by_k["sampler_k"] = (
                "sampler_k",
                np.array(cfg.sampler_ks, int),
                {"long_name": "sampler steps K"},
            )
        if _has_images(cfg):
            by_k["image_k"] = (
                "image_k",
                np.array(_image_ks(cfg)),
                {"long_name": "sampler steps K"},
            )
        return xr.Dataset(
            data_vars,
            coords=coords
            | {
                "fit_method": (
                    "fit_method",
                    list(cfg.labels),
                    {"long_name": "fitting method (objective label)"},
                ),
                "train_size": (
                    "train_size",
                    np.array(cfg.train_sizes, float),
                    {
                        "long_name": "training-set size n (inf: fresh draws every iteration)",
                        "units": "draws of x_0",
                    },
                ),
                "budget": (
                    "budget",
                    np.array(cfg.budgets),
                    {"long_name": "training budget", "units": "iterations"},
                ),
                "step": (
                    "step",
                    np.array(cfg.step_axis),
                    {
                        "long_name": "discretization step Delta (0: continuous-time objectives)",
                        "units": cfg.time_units,
                    },
                ),
                "seed": ("seed", np.array(cfg.seeds), {"long_name": "training seed"}),
                "pair": ("pair", np.arange(sizes["pair"]), {"long_name": "(t, s) evaluation pair"}),
                "t": (
                    ("entry", "pair"),
                    pairs[..., 0],
                    {"long_name": "start time t", "units": cfg.time_units},
                ),
                "s": (
                    ("entry", "pair"),
                    pairs[..., 1],
                    {"long_name": "target time s", "units": cfg.time_units},
                ),
            },
            attrs=specs,
        ).assign_coords(by_k)

    def cells(self, cfg: EstimationConfig) -> list[dict[str, int]]:
        """One cell per training program: (entry, fit_method, train_size), all steps."""
        return [
            dict(zip(_PROGRAM, idx, strict=True))
            for idx in np.ndindex(len(cfg.entries), len(cfg.methods), len(cfg.train_sizes))
        ]

    def _prepare(self, cfg: EstimationConfig, ds: xr.Dataset, r: int) -> dict:
        """Per-entry reference flows and the exact-flow sampler check."""
        label = list(cfg.entries)[r]
        data, pairs = cfg.entries[label].data, cfg.pairs(label)
        key = jax.random.fold_in(jax.random.key(cfg.seed), r)
        reference = metrics.reference_flows(data, pairs, key=key, n=cfg.eval_samples, path=cfg.path)
        grid = _law_grid(data, cfg, label)
        if np.isnan(ds["kl_estimate_exact_flow"].values[r]):
            flow = ExactFlow(data, rtol=1e-8, atol=1e-8, path=cfg.path)
            images, atoms = image_shape(data) is not None, _atoms(data)
            kl, en, x = _sample_quality(flow, data, cfg, label, jax.random.fold_in(key, 999))
            ds["kl_estimate_exact_flow"][r], ds["kl_stderr_exact_flow"][r] = kl
            ds["kl_grid_exact_flow"][r] = _grid_kl(None, data, cfg, label, None, grid)
            ds["energy_distance_exact_flow"][r] = en.value
            if atoms is not None:
                ds["memorisation_exact_flow"][r] = metrics.memorisation(x, atoms).value
            if images and not cfg.sampler_ks:
                _keep_images(ds, "images_exact_flow", dict(entry=r, image_k=0), x)
            for k_index, n_steps in enumerate(cfg.sampler_ks):
                q = dict(entry=r, sampler_k=k_index)
                kl, en, x = _sample_quality(
                    flow, data, cfg, label, jax.random.fold_in(key, 999), n_steps
                )
                ds["kl_estimate_k_exact_flow"][q] = kl[0]
                ds["kl_grid_k_exact_flow"][q] = _grid_kl(None, data, cfg, label, n_steps, grid)
                if images:
                    ds["energy_distance_k_exact_flow"][q] = en.value
                    _keep_images(ds, "images_exact_flow", dict(entry=r, image_k=k_index), x)
                    if atoms is not None:
                        ds["memorisation_k_exact_flow"][q] = metrics.memorisation(x, atoms).value
        return {"label": label, "data": data, "key": key, "reference": reference, "grid": grid}

    def run_cell(self, cfg, ds, cell, cache, *, progress):
        """One (entry, fit_method, train_size): the whole (step x seed) grid trained as one
        program (a continuous-time objective: one row at step 0), with weight snapshots at
        every budget, then evaluated."""
        r, m, n = (int(cell[d]) for d in _PROGRAM)
        if r not in cache:
            cache[r] = self._prepare(cfg, ds, r)
        ctx = cache[r]
        label, data, key, reference = ctx["label"], ctx["data"], ctx["key"], ctx["reference"]
        start = time.perf_counter()
        pairs = cfg.pairs(label)
        objective = cfg.objective(m)
        if objective is None:  # CD and CT through TrainConfig, exactly as before
            tcfg = cfg.train_config(label, cfg.steps[-1], cfg.methods[m], cfg.train_sizes[n])
            steps = list(cfg.steps)
            _, history = fit_grid(
                data,
                dataclasses.replace(tcfg, progress=progress),
                steps=steps,
                seeds=list(cfg.seeds),
                checkpoints=cfg.budgets,
            )
        else:
            settings = dataclasses.replace(
                cfg.settings(label, cfg.train_sizes[n]), progress=progress
            )
            steps = list(cfg.steps) if objective.has_step else [0.0]
            _, history = fit_grid(
                data,
                objective,
                steps=steps if objective.has_step else None,
                seeds=list(cfg.seeds),
                checkpoints=cfg.budgets,
                settings=settings,
            )
        rows = [cfg.step_axis.index(v) for v in steps]  # where these steps sit on the axis
        failed = history["failed_at"] >= 0  # (step, seed)
        at = dict(entry=r, fit_method=m, train_size=n)
        on_axis = at | {"step": rows}
        fixed = [cfg.fixed_point(m, step) for step in steps]
        learned = None
        if all(fp is not None for fp in fixed):
            teacher, learned = [], []
            for teacher_name, teacher_step in fixed:
                teach = [
                    teacher_map(
                        data, x, t, s, step=teacher_step, teacher=teacher_name, path=cfg.path
                    )
                    for (x, _), (t, s) in zip(reference, pairs, strict=True)
                ]
                teacher.append(
                    metrics.consistency_error(
                        lambda x, t, s: x,
                        data,
                        pairs,
                        key=key,
                        reference=[(y, z) for y, (_, z) in zip(teach, reference, strict=True)],
                    )
                )
                learned.append([(x, y) for (x, _), y in zip(reference, teach, strict=True)])
            te = dict(entry=r, fit_method=m, step=rows)
            ds["teacher_error"][te] = np.stack([e.per_pair for e in teacher])
            ds["teacher_error_mean"][te] = np.stack([e.mean for e in teacher])
        # every budget's snapshot: one (budget x step, seed) grid evaluated in one call per pair
        snaps = [history["checkpoints"][b].models for b in cfg.budgets]
        nb, ns = len(cfg.budgets), len(steps)
        by_budget = FittedGrid(
            jax.tree_util.tree_map(
                lambda *a: jnp.concatenate(a) if eqx.is_array(a[0]) else a[0], *snaps
            ),
            tuple(float(b) for b in cfg.budgets for _ in steps),
            tuple(cfg.seeds),
        )

        def store(name, per_pair):  # per_pair: (budget, step, seed, pair)
            ds[name][on_axis] = np.where(failed[None, :, :, None], np.nan, per_pair)
            ds[name + "_mean"][on_axis] = np.where(failed[None], np.nan, per_pair.mean(-1))

        def budget_step(err):  # (budget x step, seed, pair) -> (budget, step, seed, pair)
            return err.per_pair.reshape(nb, ns, *err.per_pair.shape[1:])

        store(
            "consistency_error",
            budget_step(
                metrics.consistency_error(by_budget, data, pairs, key=key, reference=reference)
            ),
        )
        if learned is not None:  # each step against its own teacher map
            per_step = [
                metrics.consistency_error(
                    _select(by_budget, i, ns), data, pairs, key=key, reference=learned[i]
                ).per_pair
                for i in range(ns)
            ]
            store("learning_error", np.stack(per_step, 1))
        iterations = max(cfg.budgets)
        tail = max(1, iterations // 10)
        ds["final_loss"][on_axis] = np.nanmean(history["loss"][..., -tail:], axis=-1)
        ds["failed"][on_axis] = failed
        ds["seconds_per_iteration"][at] = history["seconds_per_iteration"]
        final = history["checkpoints"][cfg.budgets[-1]]
        seed_keys = _seed_keys(key, len(cfg.seeds))
        refs = np.stack([_reference_draws(data, cfg, label, k) for k in seed_keys])
        atoms = _atoms(data)
        for k_index, n_steps in enumerate((None, *cfg.sampler_ks)):
            draws = sample_grid(
                final,
                jnp.stack([jax.random.split(k)[0] for k in seed_keys]),
                cfg.sample_size,
                dim=data.dim,
                schedule=_sampler_schedule(cfg, label, n_steps),
                skip=failed,
                path=cfg.path,
            )
            ok = np.argwhere(~failed)  # (model, 2) indices of the models that trained
            if not len(ok):
                continue
            x = np.asarray(draws, np.float64)[~failed]
            kl, en, grid_kls, memo = _estimates(
                x, refs, ok, final, atoms, data, cfg, label, n_steps, ctx["grid"]
            )
            if image_shape(data) is not None:
                first = int(np.argmin(steps))  # the method's smallest step, first seed
                kept = (n_steps is None) == (not cfg.sampler_ks) and n == len(cfg.train_sizes) - 1
                if kept and not failed[first, 0]:
                    where = dict(entry=r, fit_method=at["fit_method"], image_k=max(k_index - 1, 0))
                    _keep_images(ds, "images", where, np.asarray(draws[first, 0], np.float64))
            for m, (i, j) in enumerate(ok):
                q = at | {"step": rows[i], "seed": j}
                if n_steps is None:
                    ds["kl_estimate"][q], ds["kl_stderr"][q] = kl.value[m], kl.stderr[m]
                    ds["kl_grid"][q] = grid_kls[m]
                    ds["energy_distance"][q], ds["energy_stderr"][q] = en.value[m], en.stderr[m]
                    if memo is not None:
                        ds["memorisation"][q] = memo.value[m]
                        ds["memorisation_stderr"][q] = memo.stderr[m]
                else:
                    q = q | {"sampler_k": k_index - 1}
                    ds["kl_estimate_k"][q], ds["kl_stderr_k"][q] = kl.value[m], kl.stderr[m]
                    ds["kl_grid_k"][q] = grid_kls[m]
                    ds["energy_distance_k"][q] = en.value[m]
                    if memo is not None:
                        ds["memorisation_k"][q] = memo.value[m]
        ds["cell_wall_time"][at] = time.perf_counter() - start

    def finalize(self, cfg: EstimationConfig, ds: xr.Dataset, *, progress) -> dict[str, xr.Dataset]:
        return _analyse(cfg, ds, progress=progress)

    def dtype(self, cfg: EstimationConfig) -> str:
        return f"training {cfg.train.dtype}; ground truth {jnp.result_type(float)}"

    def report(self, tree: xr.DataTree) -> str:
        return _report(tree)

    def plot(self, tree: xr.DataTree):
        return _plot(tree)

    def figures(self, tree: xr.DataTree) -> dict:
        return _image_figures(tree)


NONE = "none"  # /summary's preferred model where no model is usable

_QUANTITIES = {
    "rate_small": "local rate over the two smallest steps",
    "rate_large": "local rate over the two largest steps",
    "delta_star": "error-minimising step Delta* (studied range)",
    "error_min": "typical-seed error at Delta*",
}
_BOOT_OF = {
    "rate_small": "rate_small",
    "rate_large": "rate_large",
    "delta_star": "best_step",
    "error_min": "error_min",
}
_GROUPS = ("entry", "fit_method", "train_size", "budget")


def _smallest_step_error(ds: xr.Dataset) -> xr.DataArray:
    """Learning error at the smallest step (consistency error for methods without a teacher)."""
    learning = ds["learning_error_mean"]
    has_teacher = learning.notnull().any([d for d in learning.dims if d != "fit_method"])
    err = xr.where(has_teacher, learning, ds["consistency_error_mean"])
    return err.isel(step=0).drop_vars(["regime", "dim", "delta", "step"])


def _analyse(cfg: EstimationConfig, ds: xr.Dataset, *, progress: bool) -> dict[str, xr.Dataset]:
    """The analysis groups of a finished study (see the module docstring): the error models
    over the methods with a step (on the positive steps), and `/objectives` over all; with
    `progress`, a line per stage and a bar of the error models' NUTS runs."""
    discrete = [m for m in range(len(cfg.methods)) if not cfg.continuous(m)]
    compare = len(cfg.methods) > 1 or cfg.sampler_ks
    out = {"/objectives": _objectives(cfg, ds)} if compare else {}
    if not discrete:
        return out
    steps = [i for i, v in enumerate(cfg.step_axis) if v > 0]
    return _analyse_steps(cfg, ds.isel(fit_method=discrete, step=steps), progress) | out


def _mean_se(x: xr.DataArray, dim: str = "seed"):
    n = x.notnull().sum(dim)
    return x.mean(dim), x.std(dim, ddof=1) / np.sqrt(n.where(n > 1))


def _objectives(cfg: EstimationConfig, ds: xr.Dataset) -> xr.Dataset:
    """The comparison of every method at its own smallest step (continuous ones at 0): the
    consistency error per budget (mean and standard error over seeds) and which method has
    the lowest; the per-iteration cost; with `sampler_ks`, the sampler quality per K and
    whether more steps help (the KL at the largest K is lower than at K = 1 by more than two
    standard errors), hurt (higher by as much) or neither."""
    labels = list(cfg.labels)
    own = [
        0 if cfg.continuous(m) else cfg.step_axis.index(min(cfg.steps)) for m in range(len(labels))
    ]
    pick = xr.DataArray(own, dims="fit_method")
    err = ds["consistency_error_mean"].drop_vars(["regime", "dim", "delta"]).isel(step=pick)
    mean, se = _mean_se(err)
    lowest = mean.fillna(np.inf).argmin("fit_method")
    best = xr.DataArray(
        np.array(labels, object)[lowest.values], dims=lowest.dims, coords=lowest.coords
    ).astype(str)
    out = {
        "consistency_error": mean.assign_attrs(
            long_name="consistency error at the method's smallest step, mean over seeds",
            units=_SQ,
        ),
        "consistency_error_se": se.assign_attrs(
            long_name="its standard error over seeds", units=_SQ
        ),
        "lowest_error": best.assign_attrs(
            long_name="method with the lowest mean consistency error"
        ),
        "step_used": xr.DataArray(
            [cfg.step_axis[i] for i in own],
            dims="fit_method",
            attrs={
                "long_name": "the step each method is compared at (0: continuous)",
                "units": cfg.time_units,
            },
        ),
        "seconds_per_iteration": ds["seconds_per_iteration"]
        .drop_vars(["regime", "dim", "delta"])
        .assign_attrs(ds["seconds_per_iteration"].attrs),
    }
    if cfg.sampler_ks:
        kl = ds["kl_estimate_k"].drop_vars(["regime", "dim", "delta"]).isel(step=pick)
        kl_mean, kl_se = _mean_se(kl)
        grid = ds["kl_grid_k"].drop_vars(["regime", "dim", "delta"]).isel(step=pick).mean("seed")
        first, last = kl_mean.isel(sampler_k=0), kl_mean.isel(sampler_k=-1)
        gap = 2 * np.sqrt(kl_se.isel(sampler_k=0) ** 2 + kl_se.isel(sampler_k=-1) ** 2)
        verdict = xr.where(
            last < first - gap, "help", xr.where(last > first + gap, "hurt", "unclear")
        )
        verdict = verdict.where(np.isfinite(first) & np.isfinite(last), "no data")
        out |= {
            "kl_estimate": kl_mean.assign_attrs(
                long_name="k-NN KL of the K-step sampler, mean over seeds", units="nats"
            ),
            "kl_estimate_se": kl_se.assign_attrs(
                long_name="its standard error over seeds", units="nats"
            ),
            "kl_grid": grid.assign_attrs(
                long_name="exact KL of the K-step sampler (1-d grid law), mean over seeds",
                units="nats",
            ),
            "kl_estimate_exact_flow": ds["kl_estimate_k_exact_flow"]
            .drop_vars(["regime", "dim", "delta"])
            .assign_attrs(
                long_name="k-NN KL of the exact-flow K-step sampler (estimator floor)", units="nats"
            ),
            "kl_grid_exact_flow": ds["kl_grid_k_exact_flow"]
            .drop_vars(["regime", "dim", "delta"])
            .assign_attrs(
                long_name="exact KL of the exact-flow K-step sampler (1-d grid law)", units="nats"
            ),
            "more_steps": verdict.astype(str).assign_attrs(
                long_name=f"K = {cfg.sampler_ks[-1]} against K = {cfg.sampler_ks[0]}: 'help' "
                "(KL lower by > 2 standard errors), 'hurt' (higher by > 2), 'unclear'",
            ),
        }
    res = xr.Dataset(out)
    for d in ("entry", "fit_method", "train_size", "budget", "sampler_k"):
        if d in res.coords and d in ds.coords:
            res[d].attrs = ds[d].attrs
    res.attrs["rule"] = (
        "each method at its own smallest step (continuous-time objectives at step 0), equal "
        "network, batch and iterations; KL at the largest budget"
    )
    return res


def _analyse_steps(cfg: EstimationConfig, ds: xr.Dataset, progress: bool) -> dict[str, xr.Dataset]:
    """Bootstrap and error models of the consistency error against the step."""
    err = ds["consistency_error_mean"].drop_vars(["regime", "dim", "delta"])
    ok = ~err.isnull().any([d for d in err.dims if d != "seed"])
    if int(ok.sum()) < 2:
        raise RuntimeError(
            "fewer than 2 seeds trained without divergence in every cell: no rate analysis "
            "(lower the learning rate or set grad_clip, then rerun with --overwrite)"
        )
    err = err.sel(seed=ok.values)
    used = json.dumps([int(v) for v in err["seed"].values])
    groups = int(np.prod([err.sizes[d] for d in err.dims if d not in ("step", "seed")]))
    what = f"analysis: bootstrap of the rates ({groups} groups, {cfg.n_boot} resamples)"
    status(what, enabled=progress)
    boot = bootstrap_rates(err, n_boot=cfg.n_boot, ci=cfg.ci, seed=cfg.seed)
    boot.attrs["seeds_used"] = used
    fits = fit_error_models(
        err,
        cfg.error_models,
        chains=cfg.chains,
        warmup=cfg.warmup,
        draws=cfg.draws,
        seed=cfg.seed,
        refits=cfg.refits,
        progress=progress,
    )
    out = {"/bootstrap": boot}
    for m, tree in fits.items():
        for node in tree.subtree:
            path = f"/error_models/{m}" + ("" if node.path == "/" else node.path)
            out[path] = node.to_dataset()
    status("analysis: PSIS-LOO comparison and the summary", enabled=progress)
    comparison = compare_error_models(fits) if len(fits) >= 2 else None
    if comparison is not None:
        out["/model_comparison"] = comparison
    out["/summary"] = _summary(cfg, ds, boot, fits, comparison)
    small = _smallest_step_error(ds).sel(seed=ok.values)
    if len(cfg.budgets) >= 2:
        out["/budget"] = bootstrap_rates(
            small, along="budget", n_boot=cfg.n_boot, ci=cfg.ci, seed=cfg.seed
        )
    finite = [v for v in cfg.train_sizes if v != math.inf]
    if len(finite) >= 2:
        out["/train_size"] = bootstrap_rates(
            small.isel(budget=-1).sel(train_size=finite),
            along="train_size",
            n_boot=cfg.n_boot,
            ci=cfg.ci,
            seed=cfg.seed,
        )
    for name in ("/budget", "/train_size"):
        if name in out:
            out[name].attrs["quantity"] = (
                "learning error at the smallest step (consistency error for methods without a teacher)"
            )
    return out


def _p_greater(a: np.ndarray, b: np.ndarray) -> float:
    """P(A > B) for independent posteriors from their draws `a` (n,) and `b` (m,): the
    fraction of all n x m pairs with a > b (the groups' fits are independent, and a model
    refitted with more draws has more of them than another)."""
    return float(np.searchsorted(np.sort(b), a, side="left").mean() / b.size)


def _summary(cfg, ds, boot, fits, comparison) -> xr.Dataset:
    """Per group (entry, fit_method, train_size, budget): the preferred usable model's posterior
    intervals next to the bootstrap CIs, the power law's check, the teacher's order and the
    posterior probabilities comparing entries."""
    names = list(fits)
    checks = {m: fits[m]["checks"].to_dataset() for m in names}
    usable = xr.concat([checks[m]["usable"] for m in names], "model").assign_coords(model=names)
    if comparison is not None:
        preferred = comparison["preferred"]
    else:
        preferred = xr.where(usable.isel(model=0), names[0], "")
    lo, hi = (1 - cfg.ci) / 2, 1 - (1 - cfg.ci) / 2
    out = {
        "preferred": xr.where(preferred == "", NONE, preferred).assign_attrs(
            long_name=f"usable model with the highest PSIS-LOO elpd ('{NONE}' if none is usable)"
        )
    }
    levels = {"": 0.5, "_low": lo, "_high": hi}
    what = {
        "": "posterior median",
        "_low": f"{cfg.ci:.0%} posterior interval, lower",
        "_high": f"{cfg.ci:.0%} posterior interval, upper",
    }
    for q, long_name in _QUANTITIES.items():
        # quantiles of the preferred model, group by group
        picked = xr.full_like(fits[names[0]]["posterior"][q].isel(chain=0, draw=0), np.nan)
        picked = picked.expand_dims(quantile=list(levels.values())).copy()
        for m in names:
            qs = fits[m]["posterior"][q].quantile(list(levels.values()), ("chain", "draw"))
            picked = xr.where(preferred == m, qs, picked)
        for suffix, level in levels.items():
            out[f"post_{q}{suffix}"] = (
                picked.sel(quantile=level, drop=True)
                .drop_vars(["chain", "draw"], errors="ignore")
                .assign_attrs(
                    long_name=f"{long_name}: {what[suffix]} (preferred model; NaN if none usable)"
                )
            )
            b = boot[_BOOT_OF[q] + suffix]
            out[f"boot_{q}{suffix}"] = b.assign_attrs(
                long_name=f"{long_name}: "
                + ("bootstrap estimate" if not suffix else b.attrs["long_name"])
                + (" (best studied step)" if q == "delta_star" else "")
            )
        # the two analyses of one quantity contradict each other: intervals that do not meet
        post_lo, post_hi = out[f"post_{q}_low"], out[f"post_{q}_high"]
        boot_lo, boot_hi = out[f"boot_{q}_low"], out[f"boot_{q}_high"]
        out[f"disagree_{q}"] = ((post_lo > boot_hi) | (boot_lo > post_hi)).assign_attrs(
            long_name=f"{long_name}: the posterior and bootstrap intervals do not overlap"
        )
    out["usable"] = usable.assign_attrs(
        long_name="model passed its predictive check and diagnostics"
    )
    out["ppc_p_value"] = (
        xr.concat([checks[m]["ppc_p_value"] for m in names], "model")
        .assign_coords(model=names)
        .assign_attrs(long_name="posterior predictive p-value")
    )
    out["reason"] = (
        xr.concat([checks[m]["reason"] for m in names], "model")
        .assign_coords(model=names)
        .assign_attrs(long_name="why a model is not usable ('ok' if usable)")
    )
    if "power_law" in fits:
        out["power_law_rejected"] = checks["power_law"]["ppc_rejected"].assign_attrs(
            long_name="the single power law fails its posterior predictive check"
        )
    # posterior probability that the local rate at small steps of one entry exceeds another's
    entries = list(ds["entry"].values)
    draws = {}
    for m in names:
        draws[m] = (
            fits[m]["posterior"]["rate_small"]
            .stack(sample=("chain", "draw"))
            .transpose(*_GROUPS, "sample")
            .values
        )
    pref = preferred.transpose(*_GROUPS).values
    shape = pref.shape
    p = np.full((len(entries),) + shape, np.nan)
    for idx in np.ndindex(*shape):
        for k in range(len(entries)):
            m_a, m_b = pref[idx], pref[(k,) + idx[1:]]
            if m_a and m_b:
                a, b = draws[m_a][idx], draws[m_b][(k,) + idx[1:]]
                p[(k,) + idx] = 0.0 if k == idx[0] else _p_greater(a, b)
    out["p_rate_small_greater"] = (
        ("entry", "other_entry", "fit_method", "train_size", "budget"),
        np.moveaxis(p, 0, 1),
        {"long_name": "posterior P(rate_small of entry > rate_small of other_entry)"},
    )
    teacher = ds["teacher_error_mean"].drop_vars(["regime", "dim", "delta"])
    out["teacher_order"] = loglog_slope(teacher, "step").assign_attrs(
        long_name="teacher's order: least-squares log-log slope of its error against step"
    )
    teachers = [cfg.fixed_point(cfg.labels.index(m), 1.0) for m in ds["fit_method"].values]
    theory = [TEACHER_ORDER.get(fp[0], np.nan) if fp else np.nan for fp in teachers]
    out["teacher_order_theory"] = (
        "fit_method",
        np.array(theory, float),
        {
            "long_name": "theoretical order in squared distance of the fixed point's teacher (2 Euler, 4 Heun)"
        },
    )
    summary = xr.Dataset(
        out,
        coords={
            "other_entry": ("other_entry", entries, {"long_name": "entry compared with"}),
            "model": ("model", names, {"long_name": "error model"}),
        },
    )
    for d in _GROUPS:  # the arithmetic above keeps the values of these coordinates, not attrs
        summary[d].attrs = ds[d].attrs
    summary.attrs = {
        "rule": "posterior numbers come from the preferred model by PSIS-LOO among those whose predictive check passed with clean diagnostics; none when none did (the report then says why)",
        "interval": f"{cfg.ci:.0%} equal-tailed posterior intervals; {cfg.ci:.0%} percentile bootstrap CIs over seeds",
    }
    return summary


def _fmt(x, digits: int = 3) -> str:
    x = float(x)
    return "nan" if not np.isfinite(x) else f"{x:.{digits}g}"


BELOW_FLOOR = "*"  # marks a k-NN estimate below the exact-flow sampler's (the estimator's floor)


def _kl(x, floor=np.nan) -> str:
    """A k-NN KL estimate for the report: a negative one is the estimator's bias, not a value;
    one below `floor` (the estimate for the exact-flow sampler) is marked `BELOW_FLOOR`."""
    if float(x) < 0:
        return "<0 (bias)"
    return _fmt(x) + (BELOW_FLOOR if float(x) < float(floor) else "")


def _interval(ds, name) -> str:
    return f"{_fmt(ds[name]):>7} [{_fmt(ds[name + '_low'])}, {_fmt(ds[name + '_high'])}]"


def _group_label(g, budget: bool = True) -> str:
    n = float(g["train_size"])
    size = "inf" if not np.isfinite(n) else f"{n:g}"
    tail = f", budget {int(g['budget'])}" if budget else ""
    return f"{g['entry'].item()} ({g['fit_method'].item()}, n={size}{tail})"


def _preferred_by_budget(summ: xr.Dataset) -> dict[str, str]:
    """{group label without the budget: "budget 150: gp, 300: two_term"} for the groups whose
    preferred model is not the same at every budget."""
    pref = summ["preferred"].transpose(*_GROUPS)
    out = {}
    for idx in np.ndindex(*pref.shape[:-1]):
        g = pref[idx]  # over budget
        labels = [NONE if v in ("", NONE) else v for v in g.values.tolist()]
        if len(set(labels)) > 1:
            out[_group_label(g.isel(budget=0), budget=False)] = "budget " + ", ".join(
                f"{int(b)}: {m}" for b, m in zip(g["budget"].values, labels, strict=True)
            )
    return out


def _what_to_change(reasons) -> str:
    """What a user can do about the reasons no model is usable for a group."""
    text = " ".join(str(r) for r in np.ravel(reasons))
    advice = []
    if "r_hat" in text or "ESS" in text or "divergent" in text:
        advice.append("more draws and warm-up (config keys `draws`, `warmup`, `refits`)")
    if "predictive check" in text:
        advice.append("another error model (none of these fits the curve's shape)")
    advice.append("more seeds (config key `seeds`) for a less noisy curve")
    return "try " + "; or ".join(advice)


def _legacy(res: xr.Dataset) -> str | None:
    missing = [d for d in ("fit_method", "train_size", "budget") if d not in res.dims]
    if missing:
        return (
            f"this file was written by an earlier mcm_prob (no {missing} axes, no checked error "
            "models); its data stay readable with xarray, and rerunning the study with this "
            "version gives the full analysis"
        )
    return None


def _report(tree: xr.DataTree) -> str:
    res = tree["results"].to_dataset()
    old = _legacy(res)
    if old:
        return old
    lines = []
    if "summary" not in tree.children:
        lines.append("study is partial: no error analysis yet (resume it to finish)")
    else:
        summ = tree["summary"].to_dataset()
        lines.append(
            "consistency error against the step Delta: "
            + summ.attrs["interval"]
            + "\nposterior numbers only from a usable model: "
            + summ.attrs["rule"]
        )
        if "model_comparison" in tree.children:
            comp = tree["model_comparison"].to_dataset()
            lines.append("\nmodel comparison (PSIS-LOO over all groups)")
            lines.append(
                f"{'model':<10} {'elpd':>9} {'se':>7} {'d_elpd':>8} {'dse':>7} {'weight':>7} {'k>0.7':>6}"
            )
            for m in comp["model"].values[np.argsort(comp["rank"].values)]:
                c = comp.sel(model=m)
                lines.append(
                    f"{m:<10} {float(c['elpd']):>9.1f} {float(c['se']):>7.1f} {float(c['elpd_diff']):>8.1f} "
                    f"{float(c['dse']):>7.1f} {float(c['weight']):>7.2f} {int(c['n_pareto_k_high']):>6}"
                )
        for m in tree["error_models"].children:
            history = tree[f"error_models/{m}"].attrs.get("refit_history")
            if history and int(tree[f"error_models/{m}"].attrs.get("refits", 0)):
                lines.append(f"{m}: {history}")
        stacked = summ.stack(group=_GROUPS).transpose("group", ...)
        budget_changes = _preferred_by_budget(summ)
        for k in range(stacked.sizes["group"]):
            g = stacked.isel(group=k)
            pref = g["preferred"].item()
            none = pref in ("", NONE)  # '' in files of earlier versions
            lines.append("")
            head = f"{_group_label(g)}: preferred model {'NONE usable' if none else pref}"
            if "power_law_rejected" in g:
                p_pl = float(g["ppc_p_value"].sel(model="power_law"))
                verdict = "REJECTED" if bool(g["power_law_rejected"]) else "not rejected"
                head += f"; single power law {verdict} by its predictive check (p = {p_pl:.3f}, rule p < {PPC_ALPHA})"
            lines.append(head)
            other = budget_changes.get(_group_label(g, budget=False))
            if other:
                lines.append(f"  NOTE the preferred model changes with the budget: {other}")
            for q, what in _QUANTITIES.items():
                boot_name = "best studied step" if q == "delta_star" else "bootstrap"
                post = (
                    "posterior (no usable model)"
                    if none
                    else f"posterior {_interval(g, 'post_' + q)}"
                )
                line = f"  {what:<46} {post}   {boot_name} {_interval(g, 'boot_' + q)}"
                if f"disagree_{q}" in g and bool(g[f"disagree_{q}"]):
                    line += "   DISAGREE: the intervals do not overlap"
                lines.append(line)
            for m in g["model"].values:
                if not bool(g["usable"].sel(model=m)):
                    lines.append(f"  {m} not used: {g['reason'].sel(model=m).item()}")
            if none:
                lines.append(
                    "  no posterior numbers for this group: " + _what_to_change(g["reason"].values)
                )
        lines.append("")
        lines.append(f"{'entry':<12} {'method':<9} {'teacher order':>13} {'theory':>7}")
        for e in summ["entry"].values:
            for m in summ["fit_method"].values:
                lines.append(
                    f"{e:<12} {m:<9} {_fmt(summ['teacher_order'].sel({'entry': e, 'fit_method': m})):>13} "
                    f"{_fmt(summ['teacher_order_theory'].sel({'fit_method': m})):>7}"
                )
        p = summ["p_rate_small_greater"].isel(fit_method=0, train_size=-1, budget=-1)
        regimes = dict(zip(res["entry"].values, res["regime"].values, strict=True))
        for a in p["entry"].values:
            for b in p["other_entry"].values:
                if regimes[a] == "smooth" and regimes[b] == "nonsmooth":
                    value = p.sel(entry=a, other_entry=b)
                    lines.append(
                        f"P(local rate at small steps: {a} > {b}) = {_fmt(value)} (posterior)"
                        if np.isfinite(value)
                        else f"P(local rate at small steps: {a} > {b}): not available (no usable "
                        "error model for one of them at the largest budget)"
                    )
        for name, along in (("budget", "budget"), ("train_size", "train_size")):
            if name not in tree.children:
                continue
            r = tree[name].to_dataset()
            lines.append("")
            lines.append(f"{r.attrs['quantity']} against {along}: error ~ C {along}^alpha")
            st = r["alpha"].stack(group=r["alpha"].dims)
            for k in range(st.sizes["group"]):
                idx = {d: st["group"].values[k][i] for i, d in enumerate(r["alpha"].dims)}
                c = r.sel(idx)
                errs = ", ".join(
                    f"{v:g}: {_fmt(e)}"
                    for v, e in zip(r[along].values, c["mean_error"].values, strict=True)
                )
                lines.append(
                    f"  {', '.join(str(v) for v in idx.values())}: alpha {_interval(c, 'alpha')}  (mean error {errs})"
                )
    if "objectives" in tree.children:
        lines += _objectives_report(tree["objectives"].to_dataset())
    if "memorisation_exact_flow" in res:
        lines += _memorisation_report(res)
    lines.append("")
    last = res.isel(budget=-1)
    lines.append(
        f"per step at budget {int(last['budget'])} (means over seeds; KL: sampler with the learned net)"
    )
    lines.append(
        f"{'entry':<12} {'method':<9} {'n':>5} {'step':>6} {'consist.':>9} {'teacher':>9} {'learning':>9} {'KL est.':>9} {'failed':>6}"
    )
    for e in res["entry"].values:
        floor = res["kl_estimate_exact_flow"].sel(entry=e)
        for m in res["fit_method"].values:
            for n in res["train_size"].values:
                for st in res["step"].values:
                    c = last.sel({"entry": e, "fit_method": m, "train_size": n, "step": st})
                    lines.append(
                        f"{e:<12} {m:<9} {n:>5g} {st:>6g} {_fmt(c['consistency_error_mean'].mean()):>9} "
                        f"{_fmt(c['teacher_error_mean']):>9} {_fmt(c['learning_error_mean'].mean()):>9} "
                        f"{_kl(c['kl_estimate'].mean(), floor):>9} {int(c['failed'].sum()):>6}"
                    )
        r = res.sel(entry=e)
        lines.append(
            f"{e:<12} k-NN estimator's offset at the exact-flow sampler (its bias, not a KL; "
            f"read the learned nets' estimates against it; {BELOW_FLOOR} = below it, not "
            f"distinguishable from exact sampling): {_fmt(r['kl_estimate_exact_flow'])} "
            f"+- {_fmt(r['kl_stderr_exact_flow'], 2)}"
        )
        if "kl_grid" in r and np.isfinite(r["kl_grid_exact_flow"]):
            grid = last.sel(entry=e)["kl_grid"]
            lines.append(
                f"{e:<12} exact KL from the 1-d grid law: exact flow {_fmt(r['kl_grid_exact_flow'])}; "
                f"learned net, per step (mean over seeds and methods): "
                + ", ".join(
                    f"{st:g}: {_fmt(grid.sel(step=st).mean())}" for st in res["step"].values
                )
            )
    lines.append("")
    lines.append(f"{'entry':<12} {'regime':<10} {'dim':>4} {'delta':>6}  data")
    for e in res["entry"].values:
        r = res.sel(entry=e)
        spec = json.loads(res.attrs.get(f"spec:{e}", "{}"))
        what = spec.get("family") or spec.get("class", "?")
        if "dataset" in spec:
            what = f"{spec['dataset']} ({spec.get('kind', '?')})"
        lines.append(
            f"{e:<12} {str(r['regime'].values):<10} {int(r['dim']):>4} {float(r['delta']):>6g}  {what}"
        )
    return "\n".join(lines)


def _kl_cells(knn: xr.DataArray, grid: xr.DataArray, ks, floor=None) -> str:
    """Per K: the k-NN KL (as `_kl`: against the exact-flow sampler's estimate `floor` at that
    K), with the exact grid-law KL in parentheses where it is finite."""
    cells = []
    for k in ks:
        g = grid.sel(sampler_k=k)
        exact = f" ({_fmt(g)})" if np.isfinite(g) else " " * 8
        below = np.nan if floor is None else floor.sel(sampler_k=k)
        cells.append(f"{_kl(knn.sel(sampler_k=k), below):>9}{exact}")
    return " ".join(cells)


def _memorisation_report(res: xr.Dataset) -> list[str]:
    """Per empirical-measure image entry, method and K: the quality of the sampler's draws
    (energy distance to exact draws of p_delta) and their memorisation, mean +- se over seeds
    (largest budget and training set, the method's smallest step), and the exact-flow
    sampler's (which returns training images up to p_delta's noise)."""
    by_k = "memorisation_k" in res
    suffix = "_k" if by_k else ""
    ks = res["sampler_k"].values if by_k else res["image_k"].values
    last = res.isel(budget=-1, train_size=-1)
    lines = [
        "",
        f"quality against memorisation at budget {int(last['budget'])}: energy distance to "
        "exact draws of p_delta / memorisation (1: new images, 0: copies of training images); "
        "the method's smallest step, mean +- se over seeds",
        f"  {'entry':<12} {'method':<12} " + " ".join(f"{'K=' + str(int(k)):>27}" for k in ks),
    ]

    def over_seeds(v):  # (step, seed[, sampler_k]) -> mean, se at the smallest step with data
        v = v if by_k else v.expand_dims(sampler_k=1, axis=-1)
        finite = np.isfinite(v).any(["seed", "sampler_k"]).values
        v = v.isel(step=int(np.argmax(finite)))
        return v.mean("seed").values, (v.std("seed", ddof=1) / np.sqrt(v.sizes["seed"])).values

    for e in res["entry"].values:
        flow_memo = res["memorisation" + suffix + "_exact_flow"].sel(entry=e)
        if not np.any(np.isfinite(flow_memo)):
            continue
        for m in res["fit_method"].values:
            c = last.sel(entry=e, fit_method=m)
            if not np.isfinite(c["memorisation" + suffix]).any():
                continue
            (en, en_se), (me, me_se) = (
                over_seeds(c[v + suffix]) for v in ("energy_distance", "memorisation")
            )
            cells = " ".join(
                f"{_fmt(a, 2):>6}+-{_fmt(b, 1):<5} / {_fmt(x, 2):>4}+-{_fmt(y, 1):<5}"
                for a, b, x, y in zip(en, en_se, me, me_se, strict=True)
            )
            lines.append(f"  {e:<12} {m:<12} {cells}")
        flow_en = res["energy_distance_k_exact_flow" if by_k else "energy_distance_exact_flow"]
        cells = " ".join(
            f"{_fmt(a, 2):>13} / {_fmt(b, 2):>11}"
            for a, b in zip(
                np.atleast_1d(flow_en.sel(entry=e).values),
                np.atleast_1d(flow_memo.values),
                strict=True,
            )
        )
        lines.append(f"  {e:<12} {'exact flow':<12} {cells}")
    return lines


def _image_figures(tree: xr.DataTree) -> dict:
    """Per image entry: the kept draws, a row per (K, sampler), the exact flow's first."""
    from ..plots import image_grid

    out = {}
    for e, r, (h, w) in image_entries(tree["results"].to_dataset()):
        rows = {}
        for k in r["image_k"].values:
            flow = r["images_exact_flow"].sel(image_k=k).values[:, : h * w]
            rows[f"exact flow, K={int(k)}"] = flow
            for m in r["fit_method"].values:
                imgs = r["images"].sel(image_k=k, fit_method=m).values[:, : h * w]
                if np.all(np.isfinite(imgs)):
                    rows[f"{m}, K={int(k)}"] = imgs
        flow = r["images_exact_flow"].values[..., : h * w]  # grey scale: the exact draws'
        low, high = float(np.nanmin(flow)), float(np.nanmax(flow))
        out[f"images_{e}"] = image_grid(rows, (h, w), limits=(low, high) if low < high else None)
    return out


def _objectives_report(obj: xr.Dataset) -> list[str]:
    """The comparison of methods: error per budget, the lowest, cost, and sampling with K steps."""
    lines = ["", f"objectives compared ({obj.attrs['rule']})"]
    for e in obj["entry"].values:
        for n in obj["train_size"].values:
            o = obj.sel(entry=e, train_size=n)
            lines.append(f"{e} (n={n:g}): consistency error, mean +- se over seeds")
            lines.append(
                f"  {'method':<18} {'step':>6} {'s/iter':>9} "
                + " ".join(f"{'budget ' + str(int(b)):>19}" for b in o["budget"].values)
            )
            for m in o["fit_method"].values:
                c = o.sel(fit_method=m)
                cells = " ".join(
                    f"{_fmt(c['consistency_error'].sel(budget=b)):>9} +- {_fmt(c['consistency_error_se'].sel(budget=b), 2):<6}"
                    for b in o["budget"].values
                )
                lines.append(
                    f"  {m:<18} {float(c['step_used']):>6g} {_fmt(c['seconds_per_iteration']):>9} {cells}"
                )
            lines.append(
                "  lowest error: "
                + ", ".join(
                    f"budget {int(b)}: {o['lowest_error'].sel(budget=b).item()}"
                    for b in o["budget"].values
                )
            )
            if "kl_estimate" not in o:
                continue
            last = o.isel(budget=-1)
            ks = [int(k) for k in o["sampler_k"].values]
            lines.append(
                f"  sampler with K steps at budget {int(last['budget'])}: k-NN KL (exact KL of the grid law where 1-d)"
            )
            lines.append(
                f"  {'method':<18} " + " ".join(f"{'K=' + str(k):>18}" for k in ks) + "  more steps"
            )
            flow = obj.sel(entry=e)
            for m in o["fit_method"].values:
                c = last.sel(fit_method=m)
                cells = _kl_cells(
                    c["kl_estimate"], c["kl_grid"], ks, flow["kl_estimate_exact_flow"]
                )
                lines.append(f"  {m:<18} {cells}  {c['more_steps'].item()}")
            lines.append(
                f"  {'exact flow':<18} "
                + _kl_cells(flow["kl_estimate_exact_flow"], flow["kl_grid_exact_flow"], ks)
                + f"  (the estimator's floor; {BELOW_FLOOR} = a method's estimate below it)"
            )
    return lines


def _plot_objectives(obj: xr.Dataset, ax_budget, ax_k) -> None:
    """Every method's consistency error against budget, and its sampler's KL against K (the
    first entry, the largest training set): which objective wins, and whether steps help."""
    o = obj.isel(entry=0, train_size=-1)
    entry = str(obj["entry"].values[0])
    for k, m in enumerate(o["fit_method"].values):
        c = o.sel(fit_method=m)
        ax_budget.errorbar(
            o["budget"],
            c["consistency_error"],
            yerr=c["consistency_error_se"],
            fmt="o-",
            color=f"C{k}",
            label=str(m),
            capsize=2,
        )
        if "kl_estimate" in o:
            last = c.isel(budget=-1)
            exact = np.all(np.isfinite(last["kl_grid"]))
            ax_k.plot(
                o["sampler_k"],
                last["kl_grid"] if exact else last["kl_estimate"],
                "o-" if exact else "s--",
                color=f"C{k}",
                label=str(m) + ("" if exact else " (k-NN)"),
            )
    ax_budget.set(
        xscale="log",
        yscale="log",
        xlabel="training budget (iterations)",
        ylabel="consistency error",
        title=f"{entry}: objectives (lowest wins)",
    )
    ax_k.set(
        xlabel="sampler steps K",
        ylabel="KL(sampler law || p_delta)",
        title=f"{entry}: more steps help or hurt (exact grid KL; k-NN where not 1-d)",
    )


def _plot(tree: xr.DataTree):
    """Error vs step with each model's fitted curve (band: preferred model), the local rate,
    the power law's residuals, and the smallest-step error against budget and n."""
    import matplotlib.pyplot as plt

    old = _legacy(tree["results"].to_dataset())
    if old:
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.text(0.5, 0.5, old, ha="center", va="center", wrap=True, fontsize=8)
        ax.axis("off")
        return fig
    res_all = res = tree["results"].to_dataset()
    if "summary" in tree.children:  # the error models' methods (those with a step)
        res = res.sel(fit_method=tree["summary"]["fit_method"].values)
    res = res.sel(step=res["step"] > 0).isel(fit_method=0, train_size=-1)
    steps = res["step"].values
    compare = "objectives" in tree.children
    fig, axes = plt.subplots(3 if compare else 2, 2, figsize=(11, 12 if compare else 8))
    (ax_err, ax_rate), (ax_res, ax_budget) = axes[:2]
    if compare:
        _plot_objectives(tree["objectives"].to_dataset(), *axes[2])
    done = "summary" in tree.children
    models = list(tree["error_models"].children) if done else []
    styles = {"power_law": ":", "two_term": "-", "gp": "--", "smooth": "--"}  # smooth: old gp
    for k, e in enumerate(res["entry"].values):
        color = f"C{k}"
        r = res.sel(entry=e).isel(budget=-1)
        ax_err.loglog(
            steps,
            np.exp(np.log(r["consistency_error_mean"]).mean("seed")),
            "o",
            color=color,
            label=f"{e}: data (geom. mean)",
        )
        ax_err.loglog(
            steps, r["teacher_error_mean"], "x", color=color, alpha=0.6, label=f"{e}: teacher only"
        )
        if not done:
            continue
        summ = tree["summary"].to_dataset().isel(fit_method=0, train_size=-1, budget=-1)
        pref = summ["preferred"].sel(entry=e).item()
        pref = None if pref in ("", NONE) else pref
        for m in models:
            curve = (
                curve_quantiles(tree[f"error_models/{m}/curve"].to_dataset())
                .isel(fit_method=0, train_size=-1, budget=-1)
                .sel(entry=e)
            )
            ax_err.loglog(
                curve["step_grid"],
                curve["q50"],
                styles.get(m, "-"),
                color=color,
                lw=1,
                label=f"{e}: {m}" + (" (preferred)" if m == pref else ""),
            )
            if m == pref:
                ax_err.fill_between(
                    curve["step_grid"], curve["q05"], curve["q95"], color=color, alpha=0.2
                )
        gp = [m for m in models if ALIASES.get(m, m) == "gp"]
        rate_model = pref or (gp or models)[0]
        rate = (
            tree[f"error_models/{rate_model}/posterior"]
            .to_dataset()["local_rate"]
            .isel(fit_method=0, train_size=-1, budget=-1)
            .sel(entry=e)
        )
        q = rate.quantile([0.05, 0.5, 0.95], ("chain", "draw"))
        ax_rate.semilogx(steps, q.sel(quantile=0.5), "o-", color=color, label=f"{e} ({rate_model})")
        ax_rate.fill_between(
            steps, q.sel(quantile=0.05), q.sel(quantile=0.95), color=color, alpha=0.2
        )
        if "power_law" in models:
            pl = (
                tree["error_models/power_law/posterior"]
                .to_dataset()
                .isel(fit_method=0, train_size=-1, budget=-1)
                .sel(entry=e)
            )
            x = np.log(steps) - tree["error_models/power_law"].attrs["mean_log_step"]
            fitted = (pl["c"] + pl["alpha"] * xr.DataArray(x, dims="step")).median(
                ("chain", "draw")
            )
            observed = np.log(r["consistency_error_mean"]).mean("seed")
            ax_res.semilogx(steps, observed - fitted.values, "o-", color=color, label=e)
    ax_res.axhline(0, color="k", lw=0.8)
    small = _smallest_step_error(res_all.sel(step=res_all["step"] > 0)).isel(fit_method=0)
    for k, e in enumerate(res["entry"].values):
        s_e = small.sel(entry=e)
        if s_e.sizes["budget"] > 1:
            ax_budget.loglog(
                s_e["budget"],
                np.exp(np.log(s_e.isel(train_size=-1)).mean("seed")),
                "o-",
                color=f"C{k}",
                label=f"{e}: vs budget",
            )
        finite = np.isfinite(s_e["train_size"].values)
        if finite.sum() > 1:
            by_n = s_e.isel(budget=-1, train_size=np.flatnonzero(finite))
            twin = ax_budget.twiny()
            twin.loglog(
                by_n["train_size"],
                np.exp(np.log(by_n).mean("seed")),
                "s--",
                color=f"C{k}",
                label=f"{e}: vs n",
            )
            twin.set_xlabel("training-set size n")
    ax_err.set(
        xlabel="discretization step Delta",
        ylabel="consistency error",
        title="error vs Delta (band: preferred model, 90%)",
    )
    ax_rate.set(
        xlabel="discretization step Delta",
        ylabel="d log e / d log Delta",
        title="local rate (band: 90% posterior)",
    )
    ax_res.set(
        xlabel="discretization step Delta",
        ylabel="mean log error - power law",
        title="residuals of the single power law",
    )
    ax_budget.set(
        xlabel="training budget (iterations)",
        ylabel="error at the smallest step",
        title="learning error at the smallest step",
    )
    for ax in (ax_err, ax_rate, ax_res):
        ax.set_xticks(steps, [f"{v:g}" for v in steps])
        ax.minorticks_off()
    for ax in axes.ravel():
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
