r"""Error-injection study: a consistency error eps_cm gives KL = O(eps_cm^2) after enough steps.

Exact check on Gaussian data: perturb the exact flow map by an affine error,
f = Phi + eps (A x + b), so that the sampler's law stays Gaussian
(`mcm_prob.sampler_law(..., perturbation=...)`) and its KL is exact. For each entry, K and eps
we record the exact KL(law || p_delta) and the injected error
eps_cm^2 = max_k E_{p_{t_k}} ||eps (A x + b)||^2 over the sampler's start times, and fit the
slope of log KL on log eps_cm^2 over the `fit_points` largest eps (1 when KL = O(eps_cm^2)).
A and b are standard normal draws (A scaled by 1/sqrt(d)) from `seed`, stored per entry.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping

import numpy as np
import xarray as xr

from .._checks import distinct, integer, number
from ..data import ClosedFormGaussian
from ..metrics import kl_gaussian
from ..sampling import affine_error, sampler_law, sampler_times
from .driver import Study, StudyConfig

__all__ = ["InjectionConfig", "InjectionStudy"]

DEFAULT_DATA = {
    "gaussian": {"family": "gaussian", "mean": [0.5, 0.5], "cov": [[0.5, 0.0], [0.0, 2.0]]}
}


@dataclasses.dataclass(frozen=True)
class InjectionConfig(StudyConfig):
    """Settings of the error-injection study (TOML table ``[error_injection]``).

    - `data`: Gaussian entries (spec or object; exact laws need Gaussian data).
    - `steps`, `h`, `delta`, `tau`: the constant-step sampler.
    - `eps`: perturbation scales; `fit_points`: the largest eps used in the slope fit; `seed`.
    """

    data: Mapping = dataclasses.field(default_factory=lambda: DEFAULT_DATA)
    steps: tuple = (2, 4, 8, 16)
    h: float = 1.0
    delta: float = 0.01
    tau: float = 0.0
    eps: tuple = tuple(np.geomspace(1e-4, 1e-1, 13).tolist())
    fit_points: int = 6
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        for label, entry in self.entries.items():
            if not isinstance(entry.data, ClosedFormGaussian):
                raise ValueError(
                    f"config key `data.{label}`: error injection needs exact Gaussian laws, "
                    f"i.e. a 'gaussian' entry; got {type(entry.data).__name__}"
                )
        object.__setattr__(self, "steps", distinct("steps", self.steps, integer))
        eps = distinct("eps", self.eps, lambda n, v: number(n, v, gt=0), min_len=2)
        object.__setattr__(self, "eps", eps)
        integer("fit_points", self.fit_points, ge=2)
        if self.fit_points > len(eps):
            raise ValueError(
                f"`fit_points` must be <= the number of eps ({len(eps)}), got {self.fit_points}"
            )
        number("h", self.h, gt=0), number("delta", self.delta, gt=0)
        number("tau", self.tau, ge=0, allow_inf=True)
        integer("seed", self.seed, ge=0, lt=2**32)


class InjectionStudy(Study):
    name = "error_injection"
    config_type = InjectionConfig

    def seeds(self, c):
        return (c.seed,)

    def schema(self, c: InjectionConfig) -> xr.Dataset:
        n, shape = len(c.entries), (len(c.entries), len(c.steps), len(c.eps))
        coords, specs = c.entry_coords(deltas=False)
        return xr.Dataset(
            {
                "kl": (
                    ("entry", "steps", "eps"),
                    np.full(shape, np.nan),
                    {"long_name": "exact KL(sampler law || p_delta)", "units": "nats"},
                ),
                "eps_cm2": (
                    ("entry", "steps", "eps"),
                    np.full(shape, np.nan),
                    {"long_name": "max_k E_{p_t_k} ||f - Phi||^2 (injected error)"},
                ),
                "slope": (
                    ("entry", "steps"),
                    np.full(shape[:2], np.nan),
                    {
                        "long_name": f"slope of log KL on log eps_cm^2 over the {c.fit_points} largest eps"
                    },
                ),
                "done": ("entry", np.zeros(n, bool), {"long_name": "cell finished and saved"}),
            },
            coords={
                "entry": ("entry", list(c.entries), {"long_name": "data entry (user label)"}),
                "dim": (
                    "entry",
                    [e.data.dim for e in c.entries.values()],
                    {"long_name": "data dimension"},
                ),
                "steps": ("steps", np.array(c.steps), {"long_name": "sampler steps K"}),
                "eps": ("eps", np.array(c.eps), {"long_name": "perturbation scale"}),
            },
            attrs={"h": c.h, "delta": c.delta, "tau": c.tau, "units_of_time": c.time_units} | specs,
        )

    def cells(self, c: InjectionConfig) -> list[dict[str, int]]:
        return [{"entry": i} for i in range(len(c.entries))]

    def run_cell(self, c, ds, cell, cache, *, progress):
        i = cell["entry"]
        label = list(c.entries)[i]
        data = c.entries[label].data
        d = data.dim
        rng = np.random.default_rng([c.seed, i])
        a, b = rng.normal(size=(d, d)) / np.sqrt(d), rng.normal(size=d)
        target = data.marginal(c.delta, c.path)
        eps = np.array(c.eps)
        for k, steps in enumerate(c.steps):
            t, _, _ = sampler_times(delta=c.delta, h=c.h, steps=steps, tau=c.tau)
            c.path.check_time("delta + steps h", t[0])
            size = float(affine_error(data, (a, b), t[:-1], path=c.path).max())
            ds["eps_cm2"][i, k] = eps**2 * size
            ds["kl"][i, k] = [
                kl_gaussian(
                    sampler_law(
                        data,
                        delta=c.delta,
                        h=c.h,
                        steps=steps,
                        tau=c.tau,
                        perturbation=(e * a, e * b),
                        path=c.path,
                    ),
                    target,
                )
                for e in eps
            ]
            top = np.argsort(eps)[-c.fit_points :]
            ds["slope"][i, k] = np.polyfit(
                np.log(ds["eps_cm2"].values[i, k, top]), np.log(ds["kl"].values[i, k, top]), 1
            )[0]
        ds.attrs[f"perturbation:{label}"] = json.dumps({"A": a.tolist(), "b": b.tolist()})

    def report(self, tree: xr.DataTree) -> str:
        res = tree["results"].to_dataset()
        lines = [
            "slope of log KL on log eps_cm^2 (1 when KL = O(eps_cm^2)); '-' = not computed yet"
        ]
        lines.append(
            f"{'entry':<14} {'dim':>4} "
            + " ".join(f"{'K=' + str(k):>8}" for k in res["steps"].values)
        )
        for g in res["entry"].values:
            row = res["slope"].sel(entry=g).values
            lines.append(
                f"{g:<14} {int(res['dim'].sel(entry=g)):>4} "
                + " ".join(f"{'-' if np.isnan(v) else format(v, '.4f'):>8}" for v in row)
            )
        return "\n".join(lines)

    def plot(self, tree: xr.DataTree):
        import matplotlib.pyplot as plt

        res = tree["results"].to_dataset()
        fig, ax = plt.subplots(figsize=(5, 4))
        for g in res["entry"].values:
            for k in res["steps"].values:
                r = res.sel(entry=g, steps=k)
                ax.loglog(
                    r["eps_cm2"], r["kl"], "o-", label=f"{g}, K={k}, slope {float(r['slope']):.2f}"
                )
        ax.set(
            xlabel="injected consistency error eps_cm^2",
            ylabel="exact KL",
            title="KL vs eps_cm^2 (Gaussian, exact law)",
        )
        ax.legend(fontsize=7)
        fig.tight_layout()
        return fig
