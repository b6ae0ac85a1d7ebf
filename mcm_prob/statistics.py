r"""Estimation-error statistics: bootstrap over seeds and checked Bayesian error models.

Input: an `xarray.DataArray` of positive errors with dims (..., ALONG, seed), ALONG the
covariate (``step`` by default; ``budget`` or ``train_size`` for the learning axes); every
other dim indexes independent groups (entry, method, budget, ...). The seed is the independent
unit: a seed's runs share its random numbers, so seeds are resampled jointly across ALONG.

* `bootstrap_rates`: percentile bootstrap over seeds (B resamples) of estimators computed from
  the per-ALONG means of log error $\bar y_i$ (log of the geometric mean over seeds):
  the least-squares slope $\alpha$ of $\bar y$ on $\log x$ (error $\approx C x^\alpha$), the
  secant slopes over the two smallest and the two largest values (`rate_small`,
  `rate_large`: local rates), the studied value with the smallest geometric-mean error
  (`best_step`) and that error (`error_min`), and the per-value mean errors.
* `loglog_slope`: the deterministic least-squares slope of log values on log ALONG (e.g. the
  teacher's discretization order).
* `fit_error_model` (every group its own posterior, all groups in one compiled NUTS program; `fit_error_models`: several, in threads), `compare_error_models`: the NumPyro error models with posterior predictive
  checks and PSIS-LOO (`mcm_prob.error_models`).
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from ._checks import error_array, integer, number
from .error_models import compare_error_models, fit_error_model, fit_error_models

__all__ = [
    "bootstrap_rates",
    "loglog_slope",
    "fit_error_model",
    "fit_error_models",
    "compare_error_models",
]


def _slope(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least-squares slope of y (..., n) on x (n,)."""
    xc = x - x.mean()
    return (y - y.mean(-1, keepdims=True)) @ xc / (xc @ xc)


def loglog_slope(values: xr.DataArray, along: str = "step") -> xr.DataArray:
    """Least-squares slope of log `values` on log `along`, per remaining index (NaN where a
    value is not finite and > 0)."""
    if along not in values.dims:
        raise ValueError(f"`values` has no dim {along!r} (dims {values.dims})")
    x = np.log(np.asarray(values[along].values, float))
    v = values.transpose(..., along)
    with np.errstate(divide="ignore", invalid="ignore"):
        logv = np.where(v.values > 0, np.log(np.where(v.values > 0, v.values, 1.0)), np.nan)
    return xr.DataArray(_slope(x, logv), dims=v.dims[:-1], coords={d: v[d] for d in v.dims[:-1]})


def bootstrap_rates(
    errors: xr.DataArray,
    *,
    along: str = "step",
    n_boot: int = 2000,
    ci: float = 0.9,
    seed: int = 0,
) -> xr.Dataset:
    """Percentile-bootstrap CIs over seeds (see the module docstring).

    **Returns:** Dataset over the group dims with, each next to `_low` / `_high` bounds:
    `alpha` (with `log_C`), `rate_small`, `rate_large`, `best_step`, `error_min`; over
    (groups, ALONG) `mean_error` (arithmetic mean over seeds) with bounds; and the draws
    `alpha_boot` (groups, boot). Attrs say the method and level.
    """
    ci = number("ci", ci, gt=0, lt=1)
    n_boot = integer("n_boot", n_boot, ge=100)
    seed = integer("seed", seed, ge=0)
    errors = error_array(errors, along=along)
    groups = list(errors.dims[:-2])
    gshape = tuple(errors.sizes[d] for d in groups)
    vals = np.asarray(errors.values, float).reshape(-1, *errors.shape[-2:])  # (G, S, J)
    loge = np.log(vals)
    x = np.log(np.asarray(errors[along].values, float))
    n_seed = vals.shape[-1]
    idx = np.random.default_rng(seed).integers(0, n_seed, size=(n_boot, n_seed))
    boot = loge[:, :, idx]  # (G, S, B, J)
    ybar_b = boot.mean(-1).transpose(0, 2, 1)  # (G, B, S)
    ybar = loge.mean(-1)  # (G, S)

    def estimates(yb):  # (..., S) -> dict of (...)
        arg = yb.argmin(-1)
        return {
            "alpha": _slope(x, yb),
            "rate_small": (yb[..., 1] - yb[..., 0]) / (x[1] - x[0]),
            "rate_large": (yb[..., -1] - yb[..., -2]) / (x[-1] - x[-2]),
            "best_step": np.exp(x[arg]),
            "error_min": np.exp(yb.min(-1)),
        }

    point, draws = estimates(ybar), estimates(ybar_b)
    lo, hi = (1 - ci) / 2, 1 - (1 - ci) / 2
    long = {
        "alpha": f"least-squares rate alpha in error ~ C {along}^alpha",
        "rate_small": f"local rate: log-log secant slope over the two smallest {along} values",
        "rate_large": f"local rate: log-log secant slope over the two largest {along} values",
        "best_step": f"studied {along} with the smallest geometric-mean error",
        "error_min": "smallest geometric-mean error over seeds",
    }
    gd = tuple(groups)
    out = {}
    for name, value in point.items():
        out[name] = (gd, value.reshape(gshape), {"long_name": long[name]})
        q = np.quantile(
            draws[name],
            [lo, hi],
            axis=-1,
            method="inverted_cdf" if name == "best_step" else "linear",
        )
        out[f"{name}_low"] = (
            gd,
            q[0].reshape(gshape),
            {"long_name": f"{ci:.0%} percentile CI, lower"},
        )
        out[f"{name}_high"] = (
            gd,
            q[1].reshape(gshape),
            {"long_name": f"{ci:.0%} percentile CI, upper"},
        )
    out["log_C"] = (
        gd,
        (ybar.mean(-1) - point["alpha"] * x.mean()).reshape(gshape),
        {"long_name": "fitted log C"},
    )
    mean_b = np.exp(boot).mean(-1)  # (G, S, B)
    sd = (*gd, along)
    out["mean_error"] = (
        sd,
        vals.mean(-1).reshape(*gshape, -1),
        {"long_name": "mean error over seeds"},
    )
    q = np.quantile(mean_b, [lo, hi], axis=-1)
    out["mean_error_low"] = (
        sd,
        q[0].reshape(*gshape, -1),
        {"long_name": f"{ci:.0%} percentile CI, lower"},
    )
    out["mean_error_high"] = (
        sd,
        q[1].reshape(*gshape, -1),
        {"long_name": f"{ci:.0%} percentile CI, upper"},
    )
    out["alpha_boot"] = (
        (*gd, "boot"),
        draws["alpha"].reshape(*gshape, n_boot),
        {"long_name": "bootstrap draws of alpha"},
    )
    ds = xr.Dataset(
        out,
        coords={d: errors[d] for d in (*groups, along)}
        | {"boot": ("boot", np.arange(n_boot), {"long_name": "bootstrap replicate"})},
        attrs={
            "method": f"percentile bootstrap over seeds (resampled jointly across {along}); estimators from per-{along} mean log error",
            "along": along,
            "ci": ci,
            "n_boot": n_boot,
            "seed": seed,
        },
    )
    ds[along].attrs = dict(errors[along].attrs)
    return ds
