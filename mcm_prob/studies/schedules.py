r"""Schedules study: which time points? Exact KL of the multi-step sampler on each schedule.

For every data entry, number of steps K and injected consistency error e, the exact
KL(sampler law || p_delta) of the sampler driven by the exact flow (perturbed by the affine error
f = Phi + e (x + 1) when e > 0, Gaussian entries only) on the schedules

* ``constant``: the paper's constant step h (horizon delta + K h, growing with K), tau = `tau`;
* ``optimal_growing``: the optimised schedule at that same horizon delta + K h;
* ``fixed_horizon`` (tau = `tau`), ``karras``, ``song``, ``ect`` (K = 2), ``halving``: horizon T
  (see `mcm_prob.Schedule`); the schedules from the literature jump to delta and re-noise at
  every step (tau = inf), as Song et al.'s multistep Algorithm 1 does;
* ``optimal``: the optimised schedule at horizon T (`mcm_prob.optimal_schedule`).

Gaussian entries have exact Gaussian laws; product entries (boxes) have 1-d grid laws, and their
schedules are optimised on the closed-form-CDF grid law (`mcm_prob.gridlaw.grid_kl_cdf`) when
`optimise_products` (no injected error for boxes: NaN). `steps_to_eps` is the smallest K of
the study's grid reaching KL <= eps^2, with the reason when none does. `finalize` stores /gain: KL(constant) / KL(optimal_growing) and the best
schedule at each K.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import numpy as np
import xarray as xr

from .._checks import distinct, integer, number
from ..accuracy import first_reaching, schedule_kl, start_error
from ..data import ClosedFormGaussian, ProductData
from ..gridlaw import check_grid_size
from ..optimal import optimal_schedule
from ..paths import OU
from ..schedules import Schedule
from .driver import Study, StudyConfig

__all__ = ["SchedulesConfig", "SchedulesStudy", "SCHEDULES"]

SCHEDULES = (
    "constant",
    "optimal_growing",
    "fixed_horizon",
    "karras",
    "song",
    "ect",
    "halving",
    "optimal",
)
_OPTIMISED = {"optimal": "T", "optimal_growing": "growing"}
# KL values below these are at the floor of the computation: the float64 Gaussian KL formula
# (cancellation in tr + quadratic - d - log det) and the 1-d grid quadrature (gridlaw doc)
KL_FLOOR = {"gaussian": 1e-14, "uniform_box": 1e-9}


def default_schedules_data() -> dict:
    """N(0.5, diag(0.5..2)) in d = 2 and 16, and the square [-1, 1]^2."""
    gauss = {
        f"gaussian_d{d}": {
            "family": "gaussian",
            "mean": [0.5] * d,
            "cov": np.diag(np.linspace(0.5, 2.0, d)).tolist(),
        }
        for d in (2, 16)
    }
    return gauss | {"box_d2": {"family": "uniform_box", "low": [-1.0] * 2, "high": [1.0] * 2}}


@dataclasses.dataclass(frozen=True)
class SchedulesConfig(StudyConfig):
    """Settings of the schedules study (TOML table ``[schedules]``).

    - `data`: entries label -> Gaussian or uniform-box spec (optional ``delta``) or object.
    - `steps`: the K studied; `h`, `tau`: the paper's constant step; `T`: the fixed horizon.
    - `errors`: injected affine consistency errors e (0 = exact flow; e > 0 Gaussian only).
    - `eps`: accuracy targets KL <= eps^2.
    - `iterations`, `learning_rate`, `n_random`, `seed`: the optimiser (Adam on log KL).
    - `delta_smooth`, `delta_nonsmooth`, `n_grid`: stop times and the grid of the grid laws.
    - `optimise_products`: also optimise the schedules of box entries (slow: about 25 s per
      (K, horizon) on 2 CPU cores).
    """

    data: Mapping = dataclasses.field(default_factory=default_schedules_data)
    steps: tuple = (1, 2, 3, 4, 6, 8)
    h: float = 0.5
    tau: float = 0.0
    T: float = 4.0
    errors: tuple = (0.0, 0.02)
    eps: tuple = (0.1, 0.03, 0.01)
    iterations: int = 300
    learning_rate: float = 0.05
    n_random: int = 4
    seed: int = 0
    delta_smooth: float = 0.01
    delta_nonsmooth: float = 0.05
    n_grid: int = 1001
    optimise_products: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.path != OU:
            raise ValueError(
                "config key `path`: the schedules study runs on the OU path only (its "
                "literature schedules and the schedule optimiser are in OU time); got "
                f"{self.path.name!r}"
            )
        for label, entry in self.entries.items():
            if not isinstance(entry.data, (ClosedFormGaussian, ProductData)):
                raise ValueError(
                    f"config key `data.{label}`: the schedules study needs exact sampler laws, "
                    "i.e. a 'gaussian' (any mean and covariance) or a 'uniform_box'; got "
                    f"{type(entry.data).__name__}"
                )
        pos = lambda n, v: number(n, v, gt=0)  # noqa: E731
        object.__setattr__(self, "steps", tuple(sorted(distinct("steps", self.steps, integer))))
        errors = distinct("errors", self.errors, lambda n, v: number(n, v, ge=0))
        object.__setattr__(self, "errors", errors)
        object.__setattr__(self, "eps", distinct("eps", self.eps, pos))
        for name in ("h", "delta_smooth", "delta_nonsmooth", "learning_rate"):
            number(name, getattr(self, name), gt=0)
        number("tau", self.tau, ge=0, allow_inf=True)
        integer("iterations", self.iterations)
        integer("n_random", self.n_random, ge=0)
        integer("seed", self.seed, ge=0, lt=2**32)
        check_grid_size(integer("n_grid", self.n_grid, ge=101))
        if not isinstance(self.optimise_products, bool):
            raise ValueError(
                f"`optimise_products` must be true or false, got {self.optimise_products!r}"
            )
        for label in self.entries:
            number("T", self.T, gt=self.entry_delta(label))


QUICK = dict(
    data={
        "gaussian_d2": default_schedules_data()["gaussian_d2"],
        "box_d1": {"family": "uniform_box", "low": [-1.0], "high": [1.0]},
    },
    steps=(1, 2, 3, 4),
    iterations=100,
    n_random=2,
    n_grid=501,
    optimise_products=False,
)


def _schedule(name: str, c: SchedulesConfig, k: int, delta: float) -> Schedule | None:
    """The named schedule with K steps, or None where it does not exist (ECT: K = 2 only;
    halving below delta)."""
    if name == "constant":
        return Schedule.constant(delta=delta, h=c.h, steps=k, tau=c.tau)
    if name == "fixed_horizon":
        return Schedule.fixed_horizon(T=c.T, delta=delta, steps=k, tau=c.tau)
    if name == "ect":
        return Schedule.ect(T=c.T, delta=delta, tau=math.inf) if k == 2 else None
    if name == "halving" and c.T / 2 ** (k - 1) <= delta:
        return None
    return getattr(Schedule, name)(T=c.T, delta=delta, steps=k, tau=math.inf)


def _error(data, e: float):
    """The injected affine consistency error e (x + 1) as `sampler_law`'s perturbation."""
    return None if e == 0 else (e * np.eye(data.dim), e * np.ones(data.dim))


class SchedulesStudy(Study):
    name = "schedules"
    config_type = SchedulesConfig
    quick = QUICK

    def seeds(self, c):
        return (c.seed,)

    def schema(self, c: SchedulesConfig) -> xr.Dataset:
        n, ne, ns, nk = len(c.entries), len(c.errors), len(SCHEDULES), len(c.steps)
        kmax = max(c.steps)
        coords, specs = c.entry_coords()
        nan = lambda *shape: np.full(shape, np.nan)  # noqa: E731
        opt = ("entry", "error", "horizon_kind", "steps")
        return xr.Dataset(
            {
                "kl": (
                    ("entry", "error", "schedule", "steps"),
                    nan(n, ne, ns, nk),
                    {"long_name": "exact KL(sampler law || p_delta)", "units": "nats"},
                ),
                "horizon": (
                    ("entry", "schedule", "steps"),
                    nan(n, ns, nk),
                    {"long_name": "start time t_0 of the schedule", "units": c.time_units},
                ),
                "start_kl": (
                    ("entry", "schedule", "steps"),
                    nan(n, ns, nk),
                    {"long_name": "start error KL(N(0, I) || p_{t_0})", "units": "nats"},
                ),
                "steps_to_eps": (
                    ("entry", "error", "schedule", "eps"),
                    nan(n, ne, ns, len(c.eps)),
                    {"long_name": "smallest studied K with KL <= eps^2 (NaN: none; see reason)"},
                ),
                "reason": (
                    ("entry", "error", "schedule", "eps"),
                    np.full((n, ne, ns, len(c.eps)), "", dtype=object),
                    {"long_name": "why steps_to_eps is NaN (empty when reached)"},
                ),
                "optimal_t": (
                    (*opt, "k"),
                    nan(n, ne, 2, nk, kmax),
                    {"long_name": "optimised start times t_k", "units": c.time_units},
                ),
                "optimal_s": (
                    (*opt, "k"),
                    nan(n, ne, 2, nk, kmax),
                    {"long_name": "optimised landing times s_k", "units": c.time_units},
                ),
                "optimal_history": (
                    (*opt, "iteration"),
                    nan(n, ne, 2, nk, c.iterations),
                    {"long_name": "best KL over the starts at each Adam iteration"},
                ),
                "done": ("entry", np.zeros(n, bool), {"long_name": "cell finished and saved"}),
            },
            coords=coords
            | {
                "family": (
                    "entry",
                    [e.data.family or "" for e in c.entries.values()],
                    {"long_name": "data family"},
                ),
                "error": (
                    "error",
                    np.array(c.errors),
                    {"long_name": "injected consistency error e: f = Phi + e (x + 1)"},
                ),
                "schedule": ("schedule", list(SCHEDULES), {"long_name": "sampler schedule"}),
                "steps": ("steps", np.array(c.steps), {"long_name": "sampler steps K (NFE)"}),
                "eps": ("eps", np.array(c.eps), {"long_name": "target accuracy: KL <= eps^2"}),
                "horizon_kind": (
                    "horizon_kind",
                    ["T", "growing"],
                    {"long_name": "optimised at horizon T, or at delta + K h (as `constant`)"},
                ),
                "k": ("k", np.arange(kmax), {"long_name": "step index"}),
            },
            attrs={
                "h": c.h,
                "tau": c.tau,
                "T": c.T,
                "note": "box entries: 1-d grid laws (floor about 1e-9), no injected error (NaN)",
            }
            | specs,  # fmt: skip
        )

    def cells(self, c):
        return [{"entry": i} for i in range(len(c.entries))]

    def run_cell(self, c, ds, cell, cache, *, progress):
        i = cell["entry"]
        label = list(c.entries)[i]
        data, delta = c.entries[label].data, c.entry_delta(label)
        gauss = isinstance(data, ClosedFormGaussian)
        grid = {"n_grid": c.n_grid}

        starts: dict[float, float] = {}

        def start(T):
            if T not in starts:
                starts[T] = start_error(data, T, **({} if gauss else grid))
            return starts[T]

        for j, name in enumerate(SCHEDULES):
            optimised = name in _OPTIMISED
            if optimised and not (gauss or c.optimise_products):
                continue
            for m, k in enumerate(c.steps):
                sched = None if optimised else _schedule(name, c, k, delta)
                if not optimised and sched is None:
                    continue
                T = (delta + k * c.h) if name in ("constant", "optimal_growing") else c.T
                ds["horizon"][i, j, m] = T
                ds["start_kl"][i, j, m] = start(T)
                for q, e in enumerate(c.errors):
                    if e > 0 and not gauss:
                        continue  # boxes: no injected error
                    if optimised:
                        ds["kl"][i, q, j, m] = self._optimise(c, ds, data, i, q, name, m, k, T, delta, e)  # fmt: skip
                    else:
                        ds["kl"][i, q, j, m] = schedule_kl(data, sched, perturbation=_error(data, e), **grid)  # fmt: skip
        for q in range(len(c.errors)):
            for j in range(len(SCHEDULES)):
                row = ds["kl"].values[i, q, j]
                ds["steps_to_eps"][i, q, j] = first_reaching(row, c.steps, c.eps)
                for p, target in enumerate(c.eps):
                    if np.isfinite(ds["steps_to_eps"].values[i, q, j, p]):
                        continue
                    ds["reason"][i, q, j, p] = self._reason(ds, c, i, j, row, target**2)

    def _optimise(self, c, ds, data, i, q, name, m, k, T, delta, e):
        res = optimal_schedule(
            data, k, T=T, delta=delta, perturbation=_error(data, e), iterations=c.iterations,
            learning_rate=c.learning_rate, n_random=c.n_random, key=jax.random.key(c.seed),
            grid={"n_grid": c.n_grid}, floor=KL_FLOOR[data.family],
        )  # fmt: skip
        h = 0 if _OPTIMISED[name] == "T" else 1
        ds["optimal_t"][i, q, h, m, :k] = res.schedule.t
        ds["optimal_s"][i, q, h, m, :k] = res.schedule.s
        if res.history.shape[1]:
            ds["optimal_history"][i, q, h, m] = res.history.min(axis=0)
        return res.kl

    @staticmethod
    def _reason(ds, c, i, j, row, target: float) -> str:
        """Why no studied K reaches KL <= target (= eps^2)."""
        finite = np.isfinite(row)
        if not finite.any():
            return "schedule not available for this entry or these K"
        starts = ds["start_kl"].values[i, j]
        fixed = SCHEDULES[j] not in ("constant", "optimal_growing")
        last = int(np.nonzero(finite)[0][-1])
        msg = f"not reached up to K = {c.steps[last]}: KL = {row[last]:.3g} > eps^2 = {target:.3g}"
        if fixed and np.isfinite(starts[last]) and starts[last] > target:
            msg += f"; the start error at T = {c.T:g} is {starts[last]:.3g} > eps^2"
        return msg

    def finalize(self, c, ds, *, progress):
        kl = ds["kl"]
        floor = xr.DataArray([KL_FLOOR[f] for f in ds["family"].values], dims="entry")
        optimised = kl.sel(schedule="optimal_growing")
        ratio = kl.sel(schedule="constant") / np.maximum(optimised, floor)
        fixed = kl.drop_sel(schedule=["constant", "optimal_growing"])
        best = fixed.fillna(np.inf).argmin("schedule")
        names = np.asarray(fixed["schedule"].values)[best.values]
        names = np.where(np.isfinite(fixed.min("schedule").values), names, "")
        gain = xr.Dataset(
            {
                "gain": (
                    ratio.dims,
                    ratio.values,
                    {
                        "long_name": "KL(constant) / KL(optimal_growing): same horizon delta + K h "
                        "(the optimised KL clipped at the computation's floor: a lower bound there)"
                    },
                ),
                "gain_at_floor": (
                    ratio.dims,
                    (optimised < floor).values,
                    {"long_name": "the optimised KL is below the floor: gain is a lower bound"},
                ),
                "best_fixed_horizon": (
                    best.dims,
                    names.astype(object),
                    {"long_name": "schedule with the smallest KL among those at horizon T"},
                ),
                "best_fixed_horizon_kl": (
                    best.dims,
                    fixed.min("schedule").values,
                    {"long_name": "its KL", "units": "nats"},
                ),
            },
            coords={d: ds[d] for d in ratio.dims} | {"regime": ds["regime"]},
        )
        return {"/gain": gain}

    def report(self, tree: xr.DataTree) -> str:
        res = tree["results"].to_dataset()
        lines = []
        for g in res["entry"].values:
            floor = KL_FLOOR.get(str(res["family"].sel(entry=g).values), 0.0)
            fmt = lambda v, f=floor: (  # noqa: E731
                "-" if not np.isfinite(v) else f"<{f:.0e}" if v < f else f"{v:.2e}"
            )
            for e in res["error"].values:
                r = res.sel(entry=g, error=e)
                if not np.isfinite(r["kl"]).any():
                    continue
                lines.append(
                    f"{g} (d = {int(r['dim'])}, delta = {float(r['delta']):g}), error e = {e:g}: "
                    f"exact KL(law || p_delta); constant/optimal_growing at horizon delta + K h "
                    f"(h = {res.attrs['h']:g}), the rest at T = {res.attrs['T']:g}"
                )
                lines.append(
                    f"{'schedule':<16}"
                    + "".join(f"{'K=' + str(k):>10}" for k in res["steps"].values)
                )
                for s in res["schedule"].values:
                    row = r["kl"].sel(schedule=s).values
                    if np.isfinite(row).any():
                        lines.append(f"{s:<16}" + "".join(f"{fmt(v):>10}" for v in row))
                lines.append(
                    "steps to KL <= eps^2: "
                    + "; ".join(
                        f"{s} "
                        + "/".join(
                            "-" if not np.isfinite(v) else str(int(v))
                            for v in r["steps_to_eps"].sel(schedule=s).values
                        )
                        for s in res["schedule"].values
                        if np.isfinite(r["kl"].sel(schedule=s)).any()
                    )
                    + f"  (eps = {'/'.join(format(x, 'g') for x in res['eps'].values)})"
                )
                for s in ("constant", "optimal"):
                    if not np.isfinite(r["kl"].sel(schedule=s)).any():
                        continue
                    for x, why in zip(
                        res["eps"].values, r["reason"].sel(schedule=s).values, strict=True
                    ):
                        if str(why):
                            lines.append(f"  {s}, eps = {x:g}: {why}")
        lines.append(
            "'<1e-14': below the float64 floor of the Gaussian KL; '<1e-09': below the 1-d "
            "grid-law quadrature floor"
        )
        if "gain" in tree.children:
            gain = tree["gain"].to_dataset()
            lines.append("gain of the optimised schedule over the constant step (same horizon):")
            for g in gain["entry"].values:
                for e in gain["error"].values:
                    row = gain["gain"].sel(entry=g, error=e).values
                    if np.isfinite(row).any():
                        lines.append(
                            f"  {g}, e = {e:g}: "
                            + ", ".join(
                                f"K={k} {'>= ' if low else ''}x{v:.3g}"
                                for k, v, low in zip(
                                    gain["steps"].values,
                                    row,
                                    gain["gain_at_floor"].sel(entry=g, error=e).values,
                                    strict=True,
                                )
                                if np.isfinite(v)
                            )
                        )
        else:
            lines.append("study is partial: no gain table yet (resume it to finish)")
        return "\n".join(lines)

    def plot(self, tree: xr.DataTree):
        import matplotlib.pyplot as plt

        res = tree["results"].to_dataset()
        entries = list(res["entry"].values)
        fig, axes = plt.subplots(1, len(entries), figsize=(4.5 * len(entries), 4), squeeze=False)
        for ax, g in zip(axes[0], entries, strict=True):
            r = res.sel(entry=g, error=res["error"].values[0])
            for s in res["schedule"].values:
                row = r["kl"].sel(schedule=s)
                if np.isfinite(row).any():
                    style = "-" if s.startswith("optimal") else "--"
                    ax.semilogy(res["steps"], row, style, marker=".", label=s)
            ax.set(xlabel="steps K", ylabel="KL(law || p_delta)", title=f"{g}: exact flow")
            ax.legend(fontsize=6)
        fig.tight_layout()
        return fig
