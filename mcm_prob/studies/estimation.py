r"""Estimation study: consistency error versus the discretization step, on the user's data.

For each data entry (label -> spec or distribution; its regime comes from the distribution),
each step Delta and each seed, a consistency net is fitted (all seeds of a step in one compiled
program) and we record on (t, s) pairs that lie on every Delta grid: the consistency error
against the exact flow; the teacher's own error (its composed Delta-steps against the exact
flow, no learning: the discretization part) and the learning error (against the composed
teacher map, which is what CD targets); and the quality of the multi-step sampler driven by the
learned net (k-NN KL estimate against the exact $p_\delta$ and energy distance to exact samples,
with standard errors), next to the same estimates for the exact flow (the estimator's floor).
Finally it fits error ~ C Delta^alpha per entry (`mcm_prob.statistics`: a bootstrap over seeds
and a NumPyro model with ArviZ diagnostics), stored in ``/bootstrap`` and ``/posterior``.

Default (the main job): a smooth 2-d Gaussian mixture and a non-smooth 2-d Dirac mixture.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr

from .. import metrics
from .._checks import distinct, integer, number, seeds
from ..flow import ExactFlow
from ..sampling import sample
from ..statistics import bootstrap_rates, posterior_rates
from ..training import TrainConfig, fit_grid, teacher_map
from .driver import TIME_UNITS, Study, StudyConfig

__all__ = ["EstimationConfig", "EstimationStudy", "DEFAULT_DATA", "DEFAULT_TRAIN"]

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
    method="cd",
    teacher="euler",
    iterations=6000,
    batch_size=256,
    width=64,
    depth=2,
    learning_rate=1e-3,
)
# TrainConfig fields that the study sets per entry and step
_STUDY_SET = ("step", "T", "delta", "chunk_size", "progress")


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
            + (f" ({set_here} are set by the study per entry and step)" if set_here else "")
            + f"; valid keys: {valid}"
        )
    return TrainConfig(**(DEFAULT_TRAIN | dict(train)))


@dataclasses.dataclass(frozen=True)
class EstimationConfig(StudyConfig):
    """Settings of the estimation study (TOML table ``[estimation]``).

    - `data`: entries label -> data spec (with an optional ``delta``) or distribution object.
    - `train`: the training settings, the keys of `mcm_prob.TrainConfig` (table
      ``[estimation.train]``; `step`, `T`, `delta` are set by the study). Defaults:
      `DEFAULT_TRAIN`, the other keys as in `TrainConfig`.
    - `steps` (each dividing the largest), `seeds`: the (Delta, seed) grid.
    - `delta_smooth`, `delta_nonsmooth`: early-stopping time of entries without their own.
    - `eval_samples`: draws per (t, s) pair; `sample_size`, `sampler_steps`, `sampler_tau`:
      the multi-step sampler quality check; `n_boot`, `chains`, `warmup`, `draws`, `ci`, `seed`:
      the rate analysis.
    """

    data: Mapping = dataclasses.field(default_factory=lambda: DEFAULT_DATA)
    train: Mapping | TrainConfig = dataclasses.field(default_factory=dict)
    steps: tuple = (0.025, 0.05, 0.1, 0.2, 0.4)
    seeds: tuple = tuple(range(8))
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
        super().__post_init__()
        object.__setattr__(self, "train", _train_config(self.train))
        steps = distinct("steps", self.steps, lambda n, v: number(n, v, gt=0), min_len=2)
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "seeds", seeds("seeds", self.seeds))
        if len(self.seeds) < 2:
            raise ValueError(
                f"config key `seeds` needs at least 2 seeds (a rate needs them), got {self.seeds}"
            )
        for name in ("eval_samples", "sampler_steps", "chains", "warmup", "draws"):
            integer(name, getattr(self, name), ge=2 if name == "chains" else 1)
        integer("sample_size", self.sample_size, ge=10)
        integer("n_boot", self.n_boot, ge=100)
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
        for name in _STUDY_SET:  # set per entry and step, not by the user
            del table["train"][name]
        return json.dumps(table, sort_keys=True)

    def train_config(self, label: str, step: float) -> TrainConfig:
        return dataclasses.replace(
            self.train,
            step=step,
            T=self.entry_delta(label) + self.horizon,
            delta=self.entry_delta(label),
            chunk_size=max(1, self.train.iterations // 20),
        )


QUICK = dict(
    train=dict(iterations=300, width=32, batch_size=128),
    steps=(0.1, 0.2, 0.4),
    seeds=(0, 1, 2, 3),
    eval_samples=512,
    sample_size=500,
    n_boot=500,
    warmup=300,
    draws=400,
)

_SQ = "squared distance (data units^2)"
_ESS, _ES = ("entry", "step", "seed"), ("entry", "step")
# name: (dims, long_name, units)
_VARIABLES = {
    "consistency_error": (_ESS + ("pair",), "E_{p_t} ||f(x,t,s) - Phi_{t->s}(x)||^2", _SQ),
    "consistency_error_mean": (_ESS, "consistency error averaged over (t, s) pairs", _SQ),
    "learning_error": (
        _ESS + ("pair",),
        "E ||f(x,t,s) - teacher map(x)||^2 (learning part)",
        _SQ,
    ),
    "learning_error_mean": (_ESS, "learning error averaged over pairs", _SQ),
    "teacher_error": (
        _ES + ("pair",),
        "E ||teacher map(x) - Phi(x)||^2 (discretization part, no learning)",
        _SQ,
    ),
    "teacher_error_mean": (_ES, "teacher error averaged over pairs", _SQ),
    "kl_estimate": (_ESS, "k-NN estimate of KL(sampler law || p_delta), learned net", "nats"),
    "kl_stderr": (_ESS, "standard error of kl_estimate", "nats"),
    "energy_distance": (_ESS, "energy distance to exact samples of p_delta", "data units"),
    "energy_stderr": (_ESS, "jackknife standard error of energy_distance", "data units"),
    "kl_estimate_exact_flow": (
        ("entry",),
        "k-NN KL estimate for the sampler with the exact flow (estimator floor)",
        "nats",
    ),
    "kl_stderr_exact_flow": (("entry",), "standard error of kl_estimate_exact_flow", "nats"),
    "energy_distance_exact_flow": (
        ("entry",),
        "energy distance for the exact-flow sampler",
        "data units",
    ),
    "final_loss": (_ESS, "mean training loss over the last 10% of iterations", None),
    "cell_wall_time": (_ES, "wall time of the cell", "s"),
}


def _sample_quality(f, data, cfg: EstimationConfig, label: str, key):
    delta = cfg.entry_delta(label)
    k1, k2 = jax.random.split(key)
    x = sample(
        f,
        k1,
        cfg.sample_size,
        dim=data.dim,
        delta=delta,
        h=cfg.horizon / cfg.sampler_steps,
        steps=cfg.sampler_steps,
        tau=cfg.sampler_tau,
    ).samples
    target = data.marginal(delta)
    kl = metrics.kl_knn(np.asarray(x, np.float64), target.log_prob)
    ref = target.sample(k2, (cfg.sample_size,))
    en = metrics.energy_distance(np.asarray(x, np.float64), np.asarray(ref))
    return kl, en


class EstimationStudy(Study):
    name = "estimation"
    config_type = EstimationConfig
    quick = QUICK
    nested = ("train",)

    def schema(self, cfg: EstimationConfig) -> xr.Dataset:
        labels = list(cfg.entries)
        sizes = {"entry": len(labels), "step": len(cfg.steps), "seed": len(cfg.seeds)}
        sizes["pair"] = len(cfg.pairs(labels[0]))
        data_vars = {}
        for name, (dims, long_name, units) in _VARIABLES.items():
            attrs = {"long_name": long_name} | ({} if units is None else {"units": units})
            data_vars[name] = (dims, np.full([sizes[d] for d in dims], np.nan), attrs)
        shape = (sizes["entry"], sizes["step"])
        data_vars["failed"] = (
            _ESS,
            np.zeros(shape + (sizes["seed"],), bool),
            {"long_name": "training diverged (non-finite loss)"},
        )
        data_vars["done"] = (_ES, np.zeros(shape, bool), {"long_name": "cell finished and saved"})
        pairs = np.array([cfg.pairs(g) for g in labels])
        coords, specs = cfg.entry_coords()
        return xr.Dataset(
            data_vars,
            coords=coords
            | {
                "step": (
                    "step",
                    np.array(cfg.steps),
                    {"long_name": "discretization step Delta", "units": TIME_UNITS},
                ),
                "seed": ("seed", np.array(cfg.seeds), {"long_name": "training seed"}),
                "pair": ("pair", np.arange(sizes["pair"]), {"long_name": "(t, s) evaluation pair"}),
                "t": (
                    ("entry", "pair"),
                    pairs[..., 0],
                    {"long_name": "start time t", "units": TIME_UNITS},
                ),
                "s": (
                    ("entry", "pair"),
                    pairs[..., 1],
                    {"long_name": "target time s", "units": TIME_UNITS},
                ),
            },
            attrs=specs,
        )

    def cells(self, cfg: EstimationConfig) -> list[dict[str, int]]:
        return [
            {"entry": r, "step": i} for r in range(len(cfg.entries)) for i in range(len(cfg.steps))
        ]

    def _prepare(self, cfg: EstimationConfig, ds: xr.Dataset, r: int) -> dict:
        """Per-entry reference flows, teacher maps and the exact-flow sampler check."""
        label = list(cfg.entries)[r]
        data, pairs = cfg.entries[label].data, cfg.pairs(label)
        key = jax.random.fold_in(jax.random.key(cfg.seed), r)
        reference = metrics.reference_flows(data, pairs, key=key, n=cfg.eval_samples)
        teacher = None
        if cfg.train.method == "cd":
            todo = [i for i in range(len(cfg.steps)) if not bool(ds["done"][r, i])]
            teacher = {
                i: [
                    teacher_map(data, x, t, s, step=cfg.steps[i], teacher=cfg.train.teacher)
                    for (x, _), (t, s) in zip(reference, pairs, strict=True)
                ]
                for i in todo
            }
        if np.isnan(ds["kl_estimate_exact_flow"].values[r]):
            flow = ExactFlow(data, rtol=1e-8, atol=1e-8)
            kl, en = _sample_quality(flow, data, cfg, label, jax.random.fold_in(key, 999))
            ds["kl_estimate_exact_flow"][r], ds["kl_stderr_exact_flow"][r] = kl
            ds["energy_distance_exact_flow"][r] = en.value
        return {
            "label": label,
            "data": data,
            "key": key,
            "reference": reference,
            "teacher": teacher,
        }

    def run_cell(self, cfg, ds, cell, cache, *, progress):
        r, i = cell["entry"], cell["step"]
        if r not in cache:
            cache[r] = self._prepare(cfg, ds, r)
        ctx = cache[r]
        label, data, key, reference = ctx["label"], ctx["data"], ctx["key"], ctx["reference"]
        start = time.perf_counter()
        tcfg = dataclasses.replace(cfg.train_config(label, cfg.steps[i]), progress=progress)
        grid, history = fit_grid(data, tcfg, steps=[cfg.steps[i]], seeds=list(cfg.seeds))
        pairs = cfg.pairs(label)
        failed = history["failed_at"][0] >= 0

        def store(name, err):
            ds[name][r, i] = np.where(failed[:, None], np.nan, err.per_pair[0])
            ds[name + "_mean"][r, i] = np.where(failed, np.nan, err.mean[0])

        store(
            "consistency_error",
            metrics.consistency_error(grid, data, pairs, key=key, reference=reference),
        )
        if ctx["teacher"] is not None:
            teach = ctx["teacher"][i]
            learned = [(x, y) for (x, _), y in zip(reference, teach, strict=True)]
            store(
                "learning_error",
                metrics.consistency_error(grid, data, pairs, key=key, reference=learned),
            )
            exact = [(y, z) for y, (_, z) in zip(teach, reference, strict=True)]
            te = metrics.consistency_error(lambda x, t, s: x, data, pairs, key=key, reference=exact)
            ds["teacher_error"][r, i] = te.per_pair
            ds["teacher_error_mean"][r, i] = te.mean
        tail = max(1, cfg.train.iterations // 10)
        ds["final_loss"][r, i] = np.nanmean(history["loss"][0, :, -tail:], axis=-1)
        ds["failed"][r, i] = failed
        for j in range(len(cfg.seeds)):
            if failed[j]:
                continue
            kl, en = _sample_quality(
                grid[0, j], data, cfg, label, jax.random.fold_in(key, 1000 + j)
            )
            ds["kl_estimate"][r, i, j], ds["kl_stderr"][r, i, j] = kl
            ds["energy_distance"][r, i, j], ds["energy_stderr"][r, i, j] = en
        ds["cell_wall_time"][r, i] = time.perf_counter() - start

    def finalize(self, cfg: EstimationConfig, ds: xr.Dataset) -> dict[str, xr.Dataset]:
        err = ds["consistency_error_mean"].drop_vars(["regime", "dim", "delta"])
        complete = ~err.isnull().any(("entry", "step"))
        err = err.sel(seed=complete.values)
        boot = bootstrap_rates(err, n_boot=cfg.n_boot, ci=cfg.ci, seed=cfg.seed)
        boot.attrs["seeds_used"] = json.dumps([int(s) for s in err["seed"].values])
        post, summary = posterior_rates(
            err, chains=cfg.chains, warmup=cfg.warmup, samples=cfg.draws, seed=cfg.seed, ci=cfg.ci
        )
        return {"/bootstrap": boot, "/posterior": post, "/posterior/diagnostics": summary}

    def dtype(self, cfg: EstimationConfig) -> str:
        return f"training {cfg.train.dtype}; ground truth {jnp.result_type(float)}"

    def report(self, tree: xr.DataTree) -> str:
        return _report(tree)

    def plot(self, tree: xr.DataTree):
        return _plot(tree)


def _fmt(x, digits: int = 3) -> str:
    x = float(x)
    return "nan" if not np.isfinite(x) else f"{x:.{digits}g}"


def _report(tree: xr.DataTree) -> str:
    res = tree["results"].to_dataset()
    lines = []
    if "bootstrap" not in tree.children:
        lines.append("study is partial: no rate analysis yet (resume it to finish)")
    else:
        boot = tree["bootstrap"].to_dataset()
        diag = tree["posterior/diagnostics"].to_dataset()
        lines.append(
            f"rate alpha in consistency error ~ C step^alpha ({boot.attrs['ci']:.0%} intervals)"
        )
        lines.append(
            f"{'entry':<12} {'alpha':>7} {'bootstrap CI':>18} {'post. mean':>10} {'HDI':>18} {'r_hat':>7} {'ESS':>7}"
        )
        for g in boot["entry"].values:
            b, d = boot.sel(entry=g), diag.sel(entry=g)
            lines.append(
                f"{g:<12} {_fmt(b['alpha']):>7} [{_fmt(b['alpha_low']):>7}, {_fmt(b['alpha_high']):>7}] "
                f"{_fmt(d['alpha_mean']):>10} [{_fmt(d['alpha_hdi_low']):>7}, {_fmt(d['alpha_hdi_high']):>7}] "
                f"{float(d['r_hat']):>7.4f} {float(d['ess_bulk']):>7.0f}"
            )
        for g, why in json.loads(diag.attrs.get("refused", "{}")).items():
            lines.append(f"  posterior rate for {g} not reported: {why}")
        if "p_alpha_first_gt_second" in diag.attrs:
            lines.append(
                f"P(alpha {diag.attrs['p_alpha_first_gt_second_entries']}) = {diag.attrs['p_alpha_first_gt_second']:.3f}"
            )
        lines.append(
            f"bootstrap: {boot.attrs['method']}; posterior: {diag.attrs['sampler']}, {diag.attrs['divergences']} divergences"
        )
    lines.append("")
    lines.append(
        f"{'entry':<12} {'step':>6} {'consist.':>9} {'teacher':>9} {'learning':>9} {'KL est.':>9} {'failed':>6}"
    )
    for g in res["entry"].values:
        r = res.sel(entry=g)
        for st in res["step"].values:
            c = r.sel(step=st)
            lines.append(
                f"{g:<12} {st:>6g} {_fmt(c['consistency_error_mean'].mean()):>9} {_fmt(c['teacher_error_mean']):>9} "
                f"{_fmt(c['learning_error_mean'].mean()):>9} {_fmt(c['kl_estimate'].mean()):>9} {int(c['failed'].sum()):>6}"
            )
        lines.append(
            f"{g:<12} exact-flow sampler KL estimate (estimator floor): {_fmt(r['kl_estimate_exact_flow'])} +- {_fmt(r['kl_stderr_exact_flow'], 2)}"
        )
    lines.append("")
    lines.append(f"{'entry':<12} {'regime':<10} {'dim':>4} {'delta':>6}  data")
    for g in res["entry"].values:
        r = res.sel(entry=g)
        spec = json.loads(res.attrs.get(f"spec:{g}", "{}"))
        what = spec.get("family") or spec.get("class", "?")
        lines.append(
            f"{g:<12} {str(r['regime'].values):<10} {int(r['dim']):>4} {float(r['delta']):>6g}  {what}"
        )
    return "\n".join(lines)


def _plot(tree: xr.DataTree):
    import matplotlib.pyplot as plt

    res = tree["results"].to_dataset()
    steps = res["step"].values
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for g in res["entry"].values:
        r = res.sel(entry=g)
        line = axes[0].loglog(
            steps, r["consistency_error_mean"].mean("seed"), "o-", label=f"{g}: learned"
        )[0]
        if "bootstrap" in tree.children:
            b = tree["bootstrap"].to_dataset().sel(entry=g)
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
        ax.set_xticks(steps, [f"{v:g}" for v in steps])
        ax.minorticks_off()
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
