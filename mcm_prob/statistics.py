r"""Rate analysis of error studies: error ~ C Delta^alpha per data entry, with honest uncertainty.

Input: an `xarray.DataArray` of positive errors with dims (entry, step, seed) (any extra dims
are averaged first). The seed is the independent unit.

* `bootstrap_rates`: resample seeds with replacement (B times, jointly across steps, since a
  seed's runs share its random numbers), refit $\log \bar e(\Delta) = \log C + \alpha\log\Delta$
  by least squares on the per-step means of log error, and report **percentile** intervals for
  alpha and for the per-step mean errors.
* `posterior_rates`: the NumPyro model
  $\log e_{e,i,j} = \log C_e + \alpha_e \log\Delta_i + u_{e,j} + \epsilon$, seed effects
  $u_{e,j} \sim N(0, \tau_e^2)$ (non-centred), Student-t noise $\epsilon \sim t_\nu(0, \sigma_e)$,
  weakly informative priors, fitted with NUTS on several chains. ArviZ diagnostics (r_hat,
  bulk ESS) and HDIs are stored with the draws; a rate whose r_hat > 1.01 or bulk ESS < the
  threshold is not reported (NaN) and the reason is recorded. Also the posterior probability
  that alpha of the first entry exceeds alpha of the second.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import xarray as xr
from numpyro.infer import MCMC, NUTS

from ._checks import integer, number

__all__ = ["bootstrap_rates", "posterior_rates", "rate_model", "R_HAT_MAX"]

R_HAT_MAX = 1.01


def _log_errors(errors: xr.DataArray) -> xr.DataArray:
    missing = {"entry", "step", "seed"} - set(errors.dims)
    if missing:
        raise ValueError(
            f"`errors` needs dims ('entry', 'step', 'seed'); missing {sorted(missing)}"
        )
    extra = [d for d in errors.dims if d not in ("entry", "step", "seed")]
    if extra:
        errors = errors.mean(extra)
    errors = errors.transpose("entry", "step", "seed")
    if errors.sizes["step"] < 2 or errors.sizes["seed"] < 2:
        raise ValueError("need at least 2 steps and 2 seeds to fit a rate")
    vals = errors.values
    if not np.all(np.isfinite(vals)) or np.any(vals <= 0):
        raise ValueError("`errors` must be finite and > 0 (drop failed runs first)")
    return np.log(errors)


def bootstrap_rates(
    errors: xr.DataArray, *, n_boot: int = 2000, ci: float = 0.9, seed: int = 0
) -> xr.Dataset:
    """Percentile-bootstrap CIs over seeds for alpha (per data entry) and the per-step mean errors.

    **Returns:** Dataset with `alpha` (entry), `alpha_low`, `alpha_high`, `log_C` (entry),
    `mean_error`, `mean_error_low`, `mean_error_high` (entry, step) and the draws
    `alpha_boot` (entry, boot); attrs say the method and level.
    """
    ci = number("ci", ci, gt=0, lt=1)
    n_boot = integer("n_boot", n_boot, ge=100)
    loge = _log_errors(errors)
    err = np.exp(loge.values)  # (R, S, J)
    x = np.log(loge["step"].values.astype(float))
    xc = x - x.mean()

    def fit(log_means):  # (..., S) -> slope, intercept
        slope = (log_means - log_means.mean(-1, keepdims=True)) @ xc / (xc @ xc)
        return slope, log_means.mean(-1) - slope * x.mean()

    n_seed = err.shape[-1]
    idx = np.random.default_rng(seed).integers(0, n_seed, size=(n_boot, n_seed))
    boot = loge.values[:, :, idx]  # (R, S, B, J)
    boot_logmean = boot.mean(-1).transpose(0, 2, 1)  # (R, B, S)
    alpha_b, _ = fit(boot_logmean)
    alpha_hat, logc_hat = fit(loge.values.mean(-1))
    boot_mean_err = np.exp(boot).mean(-1)  # (R, S, B)
    lo, hi = (1 - ci) / 2, 1 - (1 - ci) / 2
    regime, step = loge["entry"].values, loge["step"].values
    rs = ("entry", "step")
    ds = xr.Dataset(
        {
            "alpha": (
                "entry",
                alpha_hat,
                {"long_name": "fitted rate alpha in error ~ C step^alpha"},
            ),
            "alpha_low": (
                "entry",
                np.quantile(alpha_b, lo, axis=-1),
                {"long_name": f"{ci:.0%} percentile CI, lower"},
            ),
            "alpha_high": (
                "entry",
                np.quantile(alpha_b, hi, axis=-1),
                {"long_name": f"{ci:.0%} percentile CI, upper"},
            ),
            "log_C": ("entry", logc_hat, {"long_name": "fitted log C"}),
            "mean_error": (rs, err.mean(-1), {"long_name": "mean error over seeds"}),
            "mean_error_low": (
                rs,
                np.quantile(boot_mean_err, lo, axis=-1),
                {"long_name": "percentile CI, lower"},
            ),
            "mean_error_high": (
                rs,
                np.quantile(boot_mean_err, hi, axis=-1),
                {"long_name": "percentile CI, upper"},
            ),
            "alpha_boot": (("entry", "boot"), alpha_b, {"long_name": "bootstrap draws of alpha"}),
        },
        coords={"entry": regime, "step": step, "boot": np.arange(n_boot)},
        attrs={
            "method": "percentile bootstrap over seeds (resampled jointly across steps); OLS of per-step mean log error on log step",
            "ci": ci,
            "n_boot": n_boot,
            "seed": seed,
        },
    )
    ds["step"].attrs = dict(errors["step"].attrs) or {"long_name": "discretization step Delta"}
    return ds


def rate_model(log_step, regime_idx, seed_idx, n_regime: int, n_seed: int, log_err=None):
    """NumPyro program of the Bayesian rate model (see module docstring); arrays are flat."""
    with numpyro.plate("regimes", n_regime):
        log_c = numpyro.sample("log_C", dist.Normal(0.0, 10.0))
        alpha = numpyro.sample("alpha", dist.Normal(0.0, 5.0))
        sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
        tau = numpyro.sample("tau", dist.HalfNormal(1.0))
        with numpyro.plate("seeds", n_seed):
            z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    nu = numpyro.sample("nu", dist.Gamma(2.0, 0.1))
    u = z[seed_idx, regime_idx] * tau[regime_idx]
    mu = log_c[regime_idx] + alpha[regime_idx] * log_step + u
    with numpyro.plate("obs", log_step.shape[0]):
        numpyro.sample("log_err", dist.StudentT(nu, mu, sigma[regime_idx]), obs=log_err)


def posterior_rates(
    errors: xr.DataArray,
    *,
    chains: int = 4,
    warmup: int = 500,
    samples: int = 1000,
    seed: int = 0,
    ci: float = 0.9,
    min_ess: int = 400,
    progress: bool = False,
) -> tuple[xr.Dataset, xr.Dataset]:
    """Fit the Bayesian rate model with NUTS (`chains` vectorized chains).

    **Returns:** `(posterior, summary)`: the draws of alpha, log_C, sigma, tau, nu with dims
    (chain, draw, entry), and a summary Dataset with, per data entry, `alpha_mean`, `alpha_hdi_low`,
    `alpha_hdi_high`, `r_hat`, `ess_bulk` (of alpha), `reported` (bool), and attrs
    `refused` (JSON: entry -> reason) and `p_alpha_first_gt_second`.
    """
    import arviz_base as azb
    import arviz_stats  # noqa: F401  (registers the .azstats accessors)

    chains = integer("chains", chains, ge=2)  # r_hat needs several chains
    warmup, samples = integer("warmup", warmup), integer("samples", samples)
    ci, min_ess = number("ci", ci, gt=0, lt=1), integer("min_ess", min_ess)
    seed = integer("seed", seed, ge=0, lt=2**32)
    loge = _log_errors(errors)
    r, s, j = loge.shape
    ri, si, ji = np.meshgrid(np.arange(r), np.arange(s), np.arange(j), indexing="ij")
    log_step = np.log(loge["step"].values.astype(float))[si.ravel()]
    kernel = NUTS(rate_model, target_accept_prob=0.9)
    mcmc = MCMC(
        kernel,
        num_warmup=warmup,
        num_samples=samples,
        num_chains=chains,
        chain_method="vectorized",
        progress_bar=progress,
    )
    mcmc.run(
        jax.random.key(seed),
        jnp.asarray(log_step),
        jnp.asarray(ri.ravel()),
        jnp.asarray(ji.ravel()),
        r,
        j,
        log_err=jnp.asarray(loge.values.ravel()),
    )
    regimes = loge["entry"].values
    draws = mcmc.get_samples(group_by_chain=True)
    post = xr.Dataset(
        {
            name: (("chain", "draw", "entry"), np.asarray(draws[name], np.float64))
            for name in ("alpha", "log_C", "sigma", "tau")
        }
        | {"nu": (("chain", "draw"), np.asarray(draws["nu"], np.float64))},
        coords={"chain": np.arange(chains), "draw": np.arange(samples), "entry": regimes},
    )
    post["alpha"].attrs["long_name"] = "rate alpha in log error = log C + alpha log step + ..."
    divergences = int(np.asarray(mcmc.get_extra_fields()["diverging"]).sum())
    rhat = post.azstats.rhat()
    ess = post.azstats.ess(method="bulk")
    hdi = post["alpha"].azstats.hdi(ci)
    alpha_rhat, alpha_ess = rhat["alpha"].values, ess["alpha"].values
    refused = {}
    for k, name in enumerate(regimes):
        reasons = []
        if not alpha_rhat[k] <= R_HAT_MAX:
            reasons.append(f"r_hat {alpha_rhat[k]:.4f} > {R_HAT_MAX}")
        if not alpha_ess[k] >= min_ess:
            reasons.append(f"bulk ESS {alpha_ess[k]:.0f} < {min_ess}")
        if reasons:
            refused[str(name)] = (
                "; ".join(reasons) + ": run more chains/draws before reading a rate"
            )
    reported = np.array([str(n) not in refused for n in regimes])
    alpha_mean = post["alpha"].mean(("chain", "draw")).values
    hdi_vals = hdi.transpose("entry", ...).values
    summary = xr.Dataset(
        {
            "alpha_mean": (
                "entry",
                np.where(reported, alpha_mean, np.nan),
                {"long_name": "posterior mean of alpha (NaN when refused)"},
            ),
            "alpha_hdi_low": (
                "entry",
                np.where(reported, hdi_vals[:, 0], np.nan),
                {"long_name": f"{ci:.0%} HDI, lower"},
            ),
            "alpha_hdi_high": (
                "entry",
                np.where(reported, hdi_vals[:, 1], np.nan),
                {"long_name": f"{ci:.0%} HDI, upper"},
            ),
            "r_hat": ("entry", alpha_rhat, {"long_name": "rank-normalised split r_hat of alpha"}),
            "ess_bulk": ("entry", alpha_ess, {"long_name": "bulk effective sample size of alpha"}),
            "reported": ("entry", reported, {"long_name": "rate passes the diagnostics"}),
        },
        coords={"entry": regimes},
        attrs={
            "model": "log err = log C_e + alpha_e log step + u_ej + StudentT(nu, 0, sigma_e); u_ej ~ N(0, tau_e^2)",
            "sampler": f"NUTS, {chains} chains x {samples} draws after {warmup} warm-up, seed {seed}",
            "hdi_prob": ci,
            "min_ess": min_ess,
            "r_hat_max": R_HAT_MAX,
            "divergences": divergences,
            "refused": json.dumps(refused),
            "arviz": f"arviz-base {azb.__version__}, arviz-stats {arviz_stats.__version__}",
        },
    )
    if r >= 2:
        a = post["alpha"].values
        summary.attrs["p_alpha_first_gt_second"] = float(np.mean(a[..., 0] > a[..., 1]))
        summary.attrs["p_alpha_first_gt_second_entries"] = f"{regimes[0]} > {regimes[1]}"
    return post, summary
