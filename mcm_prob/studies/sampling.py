r"""Sampling study: exact KL of the multi-step sampler with the exact flow versus steps and tau.

Entries with exact sampler laws: Gaussian data (any mean and covariance; exact Gaussian laws)
and product targets (``uniform_box``: exact 1-d grid laws summed over coordinates, identical
coordinates computed once). Any other entry (an empirical measure such as the digits,
`mcm_prob.datasets`) is judged from `sample_size` draws of the sampler with its exact flow: the
energy distance to exact draws of p_delta and, for an empirical measure, the memorisation of
the draws (`mcm_prob.metrics.memorisation`); no KL, so no steps-to-eps. Entries whose points
are images keep their first draws (the exact sampler law's for Gaussians) for pictures
(`mcm-prob report` draws them). For Gaussian entries also the exact KL of the fixed-step diffusion
baselines from T, and for all entries steps-to-eps tables. `finalize` fits
steps ~ a + b log(d / eps) per regime and tau over the entries (the paper bounds the steps by
O(log(d/eps)) for smooth and O(d log(d/eps)) for non-smooth data) and stores it in ``/fits``.

Default: the Gaussian N(0.5, diag(0.5..2)) and the cube [-1, 1]^d for d = 1, 2, 4, 8.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping

import jax
import numpy as np
import xarray as xr

from .. import metrics
from .._checks import check_count, distinct, integer, number, one_of
from ..accuracy import first_reaching, kl_of_steps, steps_to_accuracy
from ..data import ClosedFormGaussian, DiracMixture, ProductData
from ..datasets import image_shape
from ..diffusion import BASELINES
from ..flow import ExactFlow
from ..gridlaw import check_grid_size, grid_points
from ..sampling import sample, sampler_law
from .driver import N_IMAGES, Study, StudyConfig, image_entries, image_variables

__all__ = ["SamplingConfig", "SamplingStudy", "default_sampling_data"]


def default_sampling_data(dims=(1, 2, 4, 8)) -> dict:
    """Gaussian N(0.5, diag(linspace(0.5, 2, d))) and the cube [-1, 1]^d for each d."""
    gauss = {
        f"gaussian_d{d}": {
            "family": "gaussian",
            "mean": [0.5] * d,
            "cov": np.diag(np.linspace(0.5, 2.0, d)).tolist(),
        }
        for d in dims
    }
    box = {
        f"box_d{d}": {"family": "uniform_box", "low": [-1.0] * d, "high": [1.0] * d} for d in dims
    }
    return gauss | box


_BASELINES = BASELINES[:-1]  # the fixed-step ones (exact laws)


@dataclasses.dataclass(frozen=True)
class SamplingConfig(StudyConfig):
    """Settings of the sampling study (TOML table ``[sampling]``).

    - `data`: entries label -> data spec (optional ``delta``) or object: Gaussian and
      uniform-box entries have exact laws, others are judged from `sample_size` draws.
    - `max_steps`, `h`, `taus`: the constant-step sampler, K = 1..max_steps, each tau (inf:
      Song et al.'s Algorithm 1).
    - `delta_smooth`, `delta_nonsmooth`: stop time of entries without their own.
    - `T`, `baselines`, `baseline_steps`: the diffusion baselines (Gaussian entries).
    - `eps`: accuracy targets KL <= eps^2; `n_grid`: grid points of the 1-d grid laws.
    - `sample_size`: draws per (entry, tau, K) for entries without exact laws.
    """

    data: Mapping = dataclasses.field(default_factory=default_sampling_data)
    max_steps: int = 12
    h: float = 0.5
    taus: tuple = (0.0, 0.5, math.inf)
    delta_smooth: float = 0.01
    delta_nonsmooth: float = 0.05
    T: float = 8.0
    baselines: tuple = _BASELINES
    baseline_steps: tuple = (4, 8, 16, 32, 64, 128, 256)
    eps: tuple = (0.1, 0.03, 0.01)
    n_grid: int = 2001
    sample_size: int = 500

    def __post_init__(self):
        super().__post_init__()
        integer("sample_size", self.sample_size, ge=3)
        pos = lambda n, v: number(n, v, gt=0)  # noqa: E731
        taus = distinct("taus", self.taus, lambda n, v: number(n, v, ge=0, allow_inf=True))
        object.__setattr__(self, "taus", taus)
        object.__setattr__(self, "eps", distinct("eps", self.eps, pos))
        object.__setattr__(
            self, "baseline_steps", distinct("baseline_steps", self.baseline_steps, integer)
        )
        object.__setattr__(
            self,
            "baselines",
            distinct("baselines", self.baselines, lambda n, v: one_of(n, v, _BASELINES), min_len=0),
        )
        check_count("max_steps", integer("max_steps", self.max_steps), "steps (K = 1..max_steps)")
        check_grid_size(integer("n_grid", self.n_grid, ge=101))
        for name in ("h", "delta_smooth", "delta_nonsmooth"):
            number(name, getattr(self, name), gt=0)
        path = self.path
        for label in self.entries:
            number("T", self.T, gt=self.entry_delta(label))
            top = self.entry_delta(label) + self.max_steps * self.h
            if top > path.t_max:
                raise ValueError(
                    f"config keys `h`, `max_steps`: the constant step reaches t_0 = delta + "
                    f"max_steps h = {top:g} (entry {label!r}), beyond the {path.name} path's time "
                    f"range [0, {path.t_max:g}]; use h <= (t_max - delta) / max_steps"
                )
        path.check_time("T", self.T)
        sde = [b for b in self.baselines if b.startswith("sde")]
        if sde and float(path.a(self.T)) == 0.0:
            raise ValueError(
                f"config key `T`: the reverse SDE of the {path.name} path is singular at T = "
                f"{self.T:g} (a(T) = 0); use T < {path.t_max:g} or drop the baselines {sde}"
            )


QUICK = dict(
    data=default_sampling_data((1, 2, 4)),
    max_steps=6,
    taus=(0.0, math.inf),
    baseline_steps=(4, 16, 64),
    n_grid=1001,
)


def _exact(data) -> bool:
    """Whether the entry's sampler laws are exact (else judged from draws)."""
    return isinstance(data, (ClosedFormGaussian, ProductData))


def _sample_variables(c: SamplingConfig) -> dict:
    """The draw-based variables, present when some entry needs them."""
    entries = [e.data for e in c.entries.values()]
    n, nt, K = len(entries), len(c.taus), c.max_steps
    out = {}
    if not all(_exact(d) for d in entries):
        dims = ("entry", "tau", "steps")
        out["energy_distance"] = (
            dims,
            np.full((n, nt, K), np.nan),
            {
                "long_name": "energy distance of sample_size draws of the exact-flow sampler "
                "to exact draws of p_delta (entries without exact laws; NaN otherwise)",
                "units": "data units",
            },
        )
        out["energy_stderr"] = (
            dims,
            np.full((n, nt, K), np.nan),
            {"long_name": "jackknife standard error of energy_distance", "units": "data units"},
        )
        out["memorisation"] = (
            dims,
            np.full((n, nt, K), np.nan),
            {
                "long_name": "mean distance of the draws to the nearest atom over the atoms' mean "
                "nearest-neighbour distance: ~1 new points, 0 copies (empirical measures only)"
            },
        )
    if any(image_shape(d) is not None for d in entries):
        pixels = max(d.dim for d in entries)
        out["images"] = (
            ("entry", "tau", "steps", "image", "pixel"),
            np.full((n, nt, K, N_IMAGES, pixels), np.nan),
            {
                "long_name": "first draws of the sampler with the exact flow (image entries; "
                "NaN otherwise or pixels beyond the entry's size)",
                "units": "data units",
            },
        )
    return out


def _draws_report(res: xr.Dataset) -> list[str]:
    """Entries without exact laws: energy distance (+- se) and memorisation per tau and K."""
    lines = [
        "entries without exact laws: energy distance of the exact-flow sampler's draws to "
        "exact draws of p_delta (+- se) [memorisation: 1 new points, 0 copies of atoms]"
    ]
    lines.append(f"{'entry':<14} {'tau':>6} {'K':>3} {'energy':>10} {'se':>9} {'memorisation':>13}")
    for g in res["entry"].values:
        r = res.sel(entry=g)
        if not np.isfinite(r["energy_distance"]).any():
            continue
        for tau in res["tau"].values:
            for k in res["steps"].values:
                c = r.sel(tau=tau, steps=k)
                memo = float(c["memorisation"])
                lines.append(
                    f"{g:<14} {tau:>6g} {int(k):>3} {float(c['energy_distance']):>10.4g} "
                    f"{float(c['energy_stderr']):>9.2g} {'-' if np.isnan(memo) else format(memo, '.3g'):>13}"
                )
    return lines


class SamplingStudy(Study):
    name = "sampling"
    config_type = SamplingConfig
    quick = QUICK

    def schema(self, c: SamplingConfig) -> xr.Dataset:
        entries = list(c.entries.values())
        n, nt, nb = len(entries), len(c.taus), len(c.baselines)
        coords, specs = c.entry_coords()
        nan = lambda *shape: np.full(shape, np.nan)  # noqa: E731
        return xr.Dataset(
            {
                "kl": (
                    ("entry", "tau", "steps"),
                    nan(n, nt, c.max_steps),
                    {"long_name": "exact KL(sampler law || p_delta), exact flow", "units": "nats"},
                ),
                "steps_to_eps": (
                    ("entry", "tau", "eps"),
                    nan(n, nt, len(c.eps)),
                    {"long_name": "smallest steps with KL <= eps^2 (NaN: more than max_steps)"},
                ),
                "kl_baseline": (
                    ("baseline", "entry", "baseline_steps"),
                    nan(nb, n, len(c.baseline_steps)),
                    {
                        "long_name": "exact KL(baseline law || p_delta) (Gaussian entries; NaN otherwise)",
                        "units": "nats",
                    },
                ),
                "nfe_to_eps_baseline": (
                    ("baseline", "entry", "eps"),
                    nan(nb, n, len(c.eps)),
                    {
                        "long_name": "smallest NFE with KL <= eps^2 (NaN: more than 4096 steps or not Gaussian)"
                    },
                ),
                "reason_baseline": (
                    ("baseline", "entry", "eps"),
                    np.full((nb, n, len(c.eps)), "", dtype=object),
                    {"long_name": "why nfe_to_eps_baseline is NaN (empty when reached)"},
                ),
                "done": ("entry", np.zeros(n, bool), {"long_name": "cell finished and saved"}),
            }
            | _sample_variables(c)
            | image_variables(entries),
            coords=coords
            | {
                "family": (
                    "entry",
                    [e.data.family or "" for e in entries],
                    {"long_name": "data family"},
                ),
                "tau": (
                    "tau",
                    np.array(c.taus),
                    {
                        "long_name": "re-noising length tau (inf: Song et al. Algorithm 1)",
                        "units": c.time_units,
                    },
                ),
                "steps": (
                    "steps",
                    np.arange(1, c.max_steps + 1),
                    {"long_name": "sampler steps K (NFE)"},
                ),
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
                "T_baselines": c.T,
                "note": "uniform_box KL values come from 1-d grid laws: values below about 1e-9 are at the quadrature floor",
            }
            | specs,
        )

    def cells(self, c: SamplingConfig) -> list[dict[str, int]]:
        return [{"entry": i} for i in range(len(c.entries))]

    def run_cell(self, c, ds, cell, cache, *, progress):
        i = cell["entry"]
        label = list(c.entries)[i]
        data, delta = c.entries[label].data, c.entry_delta(label)
        steps = np.arange(1, c.max_steps + 1)
        if not _exact(data):
            self._from_draws(c, ds, i, data, delta)
            return
        for j, tau in enumerate(c.taus):
            if isinstance(data, ClosedFormGaussian):
                kl = kl_of_steps(data, delta=delta, h=c.h, tau=tau, path=c.path)
                row = [kl(int(k)) for k in steps]
            else:  # a box: the sum of its 1-d factors' KLs, each factor's row computed once
                row = sum(
                    np.array(self._factor_row(c, cache, fac, delta, tau, steps))
                    for fac in data.factors()
                ).tolist()
            ds["kl"][i, j] = row
            ds["steps_to_eps"][i, j] = first_reaching(row, steps, c.eps)
        if not isinstance(data, ClosedFormGaussian):
            return
        if image_shape(data) is not None:  # pictures: draws of the exact sampler laws
            key = jax.random.fold_in(jax.random.key(0), i)
            for j, tau in enumerate(c.taus):
                for k in steps:
                    law = sampler_law(data, delta=delta, h=c.h, steps=int(k), tau=tau, path=c.path)
                    x = law.sample(jax.random.fold_in(key, j * len(steps) + k), (N_IMAGES,))
                    ds["images"][i, j, k - 1, :, : data.dim] = np.asarray(x, np.float64)
        for m, method in enumerate(c.baselines):
            kl = kl_of_steps(data, sampler=method, delta=delta, T=c.T, path=c.path)
            ds["kl_baseline"][m, i] = [kl(int(k)) for k in c.baseline_steps]
            found = [
                steps_to_accuracy(data, e, sampler=method, delta=delta, T=c.T, path=c.path)
                for e in c.eps
            ]
            ds["nfe_to_eps_baseline"][m, i] = [
                np.nan if r["nfe"] is None else r["nfe"] for r in found
            ]
            ds["reason_baseline"][m, i] = [r["reason"] or "" for r in found]

    @staticmethod
    def _from_draws(c: SamplingConfig, ds: xr.Dataset, i: int, data, delta: float) -> None:
        """An entry without exact laws: `sample_size` draws of the sampler with the exact flow
        per (tau, K) against as many exact draws of p_delta (energy distance), their
        memorisation (empirical measures) and, for images, the first draws kept."""
        flow = ExactFlow(data, rtol=1e-8, atol=1e-8, path=c.path)
        key = jax.random.fold_in(jax.random.key(0), i)
        ref = data.marginal(delta, c.path).sample(jax.random.fold_in(key, 10**6), (c.sample_size,))
        atoms = np.asarray(data.atoms, np.float64) if isinstance(data, DiracMixture) else None
        for j, tau in enumerate(c.taus):
            for k in range(1, c.max_steps + 1):
                x = sample(
                    flow,
                    jax.random.fold_in(key, j * c.max_steps + k),
                    c.sample_size,
                    dim=data.dim,
                    delta=delta,
                    h=c.h,
                    steps=k,
                    tau=tau,
                    path=c.path,
                ).samples
                x = np.asarray(x, np.float64)
                en = metrics.energy_distance(x, np.asarray(ref, np.float64))
                ds["energy_distance"][i, j, k - 1], ds["energy_stderr"][i, j, k - 1] = en
                if atoms is not None:
                    ds["memorisation"][i, j, k - 1] = metrics.memorisation(x, atoms).value
                if "images" in ds and image_shape(data) is not None:
                    ds["images"][i, j, k - 1, :, : data.dim] = x[:N_IMAGES]

    @staticmethod
    def _factor_row(c, cache: dict, factor, delta: float, tau: float, steps) -> list[float]:
        """K -> exact KL of a 1-d box factor, shared by every entry with that factor (the
        cubes [-1, 1]^d of the default all have one): `cache` persists across cells."""
        spec = json.dumps(factor.to_spec())
        if ("grid", spec, delta) not in cache:  # one grid per factor and delta (OU coordinates)
            u_delta = float(c.path.ou_time(delta))
            cache["grid", spec, delta] = grid_points(factor, u_delta, c.n_grid)
        key = ("box factor", spec, delta, tau)
        if key not in cache:
            grid = cache["grid", spec, delta]
            kl = kl_of_steps(factor, delta=delta, h=c.h, tau=tau, grid=grid, path=c.path)
            cache[key] = [kl(int(k)) for k in steps]
        return cache[key]

    def finalize(self, c: SamplingConfig, ds: xr.Dataset, *, progress) -> dict[str, xr.Dataset]:
        regimes = sorted(set(ds["regime"].values.tolist()))
        a, b, cells = (np.full((len(regimes), len(c.taus)), np.nan) for _ in range(3))
        for r, g in enumerate(regimes):
            sel = ds["steps_to_eps"].where(ds["regime"] == g, drop=True)
            for j, tau in enumerate(c.taus):
                k = sel.sel(tau=tau)
                x = np.log(k["dim"].values[:, None] / k["eps"].values[None, :]).ravel()
                y = k.values.ravel()
                ok = np.isfinite(y)
                cells[r, j] = ok.sum()
                if ok.sum() >= 3 and np.ptp(x[ok]) > 0:
                    b[r, j], a[r, j] = np.polyfit(x[ok], y[ok], 1)
        dims = ("regime", "tau")
        fits = xr.Dataset(
            {
                "a": (dims, a, {"long_name": "intercept of steps ~ a + b log(d/eps)"}),
                "b": (dims, b, {"long_name": "slope of steps ~ a + b log(d/eps)"}),
                "cells": (dims, cells, {"long_name": "finite steps_to_eps cells in the fit"}),
            },
            coords={"regime": ("regime", regimes, {"long_name": "regime"}), "tau": ds["tau"]},
            attrs={"method": "least squares over entries of the regime and eps (NaN: < 3 cells)"},
        )
        return {"/fits": fits}

    def report(self, tree: xr.DataTree) -> str:
        res = tree["results"].to_dataset()
        dash = lambda v: "-" if np.isnan(v) else str(int(v))  # noqa: E731
        eps = res["eps"].values
        lines = [
            "steps to reach KL <= eps^2 (multi-step sampler, exact flow; '-' = more than max_steps)"
        ]
        lines.append(
            f"{'entry':<14} {'regime':<10} {'dim':>4} {'tau':>6} "
            + " ".join(f"{'eps=' + format(e, 'g'):>9}" for e in eps)
        )
        for g in res["entry"].values:
            r = res.sel(entry=g)
            if "energy_distance" in res and np.isfinite(r["energy_distance"]).any():
                continue  # no exact law: its draws are reported below
            for tau in res["tau"].values:
                row = r["steps_to_eps"].sel(tau=tau).values
                lines.append(
                    f"{g:<14} {str(r['regime'].values):<10} {int(r['dim']):>4} {tau:>6g} "
                    + " ".join(f"{dash(v):>9}" for v in row)
                )
        for g in res["entry"].values:
            for tau in res["tau"].values:
                row, kl = (res[v].sel(entry=g, tau=tau).values for v in ("steps_to_eps", "kl"))
                for e in eps[np.isnan(row) & np.isfinite(kl[-1])]:
                    lines.append(
                        f"  '-' for {g}, tau = {tau:g}, eps = {e:g}: max_steps = "
                        f"{int(res['steps'][-1])} ran out (KL there {kl[-1]:.3g} > eps^2 = {e**2:.3g})"
                    )
        if "fits" in tree.children:
            fits = tree["fits"].to_dataset()
            lines.append(
                "fit steps ~ a + b log(d / eps) per regime over the table (the paper's bounds: "
                "O(log(d/eps)) smooth, O(d log(d/eps)) non-smooth)"
            )
            for g in fits["regime"].values:
                for tau in fits["tau"].values:
                    f = fits.sel(regime=g, tau=tau)
                    if np.isfinite(f["b"]):
                        lines.append(
                            f"{g:<10} tau={tau:<6g} b = {float(f['b']):.2f}, a = {float(f['a']):.2f} ({int(f['cells'])} cells)"
                        )
        else:
            lines.append("study is partial: no fits yet (resume it to finish)")
        if "energy_distance" in res:
            lines += _draws_report(res)
        gauss = [g for g in res["entry"].values if res["family"].sel(entry=g) == "gaussian"]
        if gauss and res.sizes["baseline"]:
            lines.append(
                "NFE to reach KL <= eps^2, diffusion baselines with the exact score (Gaussian entries)"
            )
            for m in res["baseline"].values:
                for g in gauss:
                    row = res["nfe_to_eps_baseline"].sel(baseline=m, entry=g).values
                    lines.append(f"{m:<20} {g:<14} " + " ".join(f"{dash(v):>9}" for v in row))
            why = res.get("reason_baseline")
            for m in res["baseline"].values if why is not None else ():
                for g in gauss:
                    for e, text in zip(eps, why.sel(baseline=m, entry=g).values, strict=True):
                        if str(text):
                            lines.append(f"  '-' for {m}, {g}, eps = {e:g}: {text}")
        return "\n".join(lines)

    def figures(self, tree: xr.DataTree) -> dict:
        """Per image entry: its kept draws at K = 1, 2, 4 (those up to max_steps), each tau."""
        from ..plots import image_grid

        res = tree["results"].to_dataset()
        out = {}
        for e, r, (h, w) in image_entries(res):
            if not np.isfinite(r["images"].values[..., : h * w]).any():
                continue
            rows = {
                f"tau={tau:g}, K={k}": r["images"].sel(tau=tau, steps=k).values[:, : h * w]
                for tau in res["tau"].values
                for k in (1, 2, 4)
                if k <= res.sizes["steps"]
            }
            out[f"images_{e}"] = image_grid(
                {k: v for k, v in rows.items() if np.isfinite(v).all()}, (h, w)
            )
        return out

    def plot(self, tree: xr.DataTree):
        """One panel of KL(law || p_delta) against K per regime (entries with exact laws),
        and one of the energy distance (+- its standard error) for entries without them."""
        import matplotlib.pyplot as plt

        res = tree["results"].to_dataset()
        exact = res["kl"].notnull().any(("tau", "steps")).values
        regimes = sorted(set(res["regime"].values[exact].tolist()))
        energy = "energy_distance" in res and not exact.all()
        n = len(regimes) + energy
        fig, axes = plt.subplots(1, n, figsize=(5 * n, 4), squeeze=False)
        for ax, g in zip(axes[0], regimes, strict=False):
            for e in res["entry"].values[exact & (res["regime"].values == g)]:
                for tau in res["tau"].values:
                    ax.semilogy(
                        res["steps"],
                        res["kl"].sel(entry=e, tau=tau),
                        marker=".",
                        label=f"{e}, tau={tau:g}",
                    )
            ax.set(
                xlabel="steps K",
                ylabel="KL(law || p_delta)",
                title=f"{g}: multi-step sampler, exact flow",
            )
            ax.legend(fontsize=6)
        if energy:
            ax = axes[0, -1]
            for e in res["entry"].values[~exact]:
                for tau in res["tau"].values:
                    c = res.sel(entry=e, tau=tau)
                    ax.errorbar(res["steps"], c["energy_distance"], yerr=c["energy_stderr"],
                                marker=".", capsize=2, label=f"{e}, tau={tau:g}")  # fmt: skip
            ax.axhline(0.0, color="0.6", lw=0.8)
            ax.set(
                xlabel="steps K",
                ylabel="energy distance to exact p_delta draws",
                title="no exact law: exact-flow sampler draws",
            )
            ax.legend(fontsize=6)
        fig.tight_layout()
        return fig
