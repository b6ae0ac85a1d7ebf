r"""Checked Bayesian models of estimation error against the discretization step.

**Data.** `errors`: a positive `xarray.DataArray` with dims ``step`` and ``seed``; every other
dim (``entry``, ``budget``, ``method``, ``train_size``, ...) indexes independent *groups*, each
with its own parameters. We model $y_{gij} = \log e_{gij}$ at centred log steps
$x_i = \log\Delta_i - \overline{\log\Delta}$:

$$y_{g\cdot j} = m_g(x) + u_{gj} \mathbf 1 + \epsilon_{g\cdot j}, \qquad
y_{g\cdot j} \sim t_{\nu_g}\big(m_g(x),\ \sigma_g^2 I + \tau_g^2 \mathbf 1 \mathbf 1^T\big),$$

a seed effect $u_{gj}$ (a seed's runs share their random numbers) and noise, heavy-tailed on
the log scale: each seed's curve $y_{g\cdot j}$ (its S log errors) is multivariate Student-t,
the seed effect integrated out in closed form (no per-seed parameters, so NUTS stays fast; its
conditional mean is stored as `seed_effect`). Seeds are the independent units, so the
pointwise log likelihood (and PSIS-LOO) is per seed curve. Mean curves $m_g$:

* ``"power_law"``: $m(x) = c + \alpha x$ (error $\propto \Delta^\alpha$);
* ``"two_term"``: $m(x) = \log(e^{a + p (x - x_{max})} + e^{b - q (x - x_{min})})$, a
  discretization term $A\Delta^p$ ($p > 0$; $a$ its log at the largest step) plus a learning
  term $B\Delta^{-q}$ ($q \ge 0$: it may grow as the step shrinks, $q = 0$ is a floor; $b$ its
  log at the smallest step);
* ``"gp"``: $m(x) = c + \beta x + h(x)$, $h \sim GP(0, \eta^2 e^{-(x - x')^2 / 2\ell^2})$
  with fixed $\eta = 1$ (log-error units) and $\ell = r/3$ ($r$ the range of $x$), minus
  its least-squares line through the studied steps (so $c + \beta x$ is the line and $h$ the
  curvature); represented by its values at the studied steps (non-centred); between them the
  curve is the GP's conditional mean, so it yields a local rate at every step.

Priors (log scale, weakly informative): $c, a, b \sim N(0, 10)$, $\alpha, \beta \sim N(0, 5)$,
$p \sim \mathrm{Gamma}(2, 1)$, $q \sim N^+(0, 1.5)$,
$\sigma, \tau \sim N^+(0, 1)$, $\nu \sim \mathrm{Gamma}(2, 0.1)$.

**Derived quantities** (per posterior draw, on the typical-seed curve $m_g$, so errors are
geometric means over seeds): `local_rate` $= dm/dx$ at each studied step; `rate_small` and
`rate_large`, the secant slopes of $m$ over the two smallest and the two largest steps (the same
estimands as the bootstrap's); `delta_star`, the step in $[\Delta_{min}, \Delta_{max}]$ that
minimises $m$ (on a grid of 401 log-spaced steps) and `error_min` $= e^{m(\Delta^*)}$.

**Posterior predictive check.** With $\bar r_i = \frac1J\sum_j (y_{gij} - m_g(x_i))$ the mean
residual at step i, the discrepancy per group is $D(y, \theta) = \sum_i (\bar r_i - \bar{\bar r})^2$
(large when the curve's *shape* is wrong, whatever the seed effects), and
$p_g = P(D(y^{rep}, \theta) \ge D(y, \theta) \mid y)$. **Rule:** the model is rejected for a
group when $p_g < 0.05$ (posterior predictive p-values are conservative, so a correct model is
rejected less than 5% of the time). A model's numbers for a group are *usable* only when it is
not rejected, every parameter of the group has $\hat R \le 1.01$ and bulk ESS $\ge$ `min_ess`,
and the group's chains had no divergent transitions.

**Sampling.** Each group is its own posterior: `chains` NUTS chains per group (NumPyro's NUTS,
its own step size and diagonal mass matrix), all groups' chains as vectorised lanes of one
compiled program per model and shape; a group's random numbers come from `seed` and the
group's coordinates, so a group fitted alone gets exactly the draws it gets among the others
(tested). Divergences are counted per group (``checks.divergences``; ``sample_stats`` has the
group dims).

`fit_error_model` returns an `xarray.DataTree` in ArviZ's layout (``posterior``,
``posterior_predictive``, ``log_likelihood``, ``sample_stats``, ``observed_data``; dims
``chain``, ``draw``) plus ``checks`` (per group), ``curve`` (quantile bands of $e^{m}$ on a
fine step grid) and ``loo_pit``, so `arviz_stats.loo`, `compare`, `summary`, `ess` and `rhat`
work on it as it is. `compare_error_models` ranks models by PSIS-LOO (overall and per group).

**LOO-PIT.** The log likelihood is per seed curve, so `arviz_stats.loo_pit` cannot pair it with
single errors by itself; ``loo_pit`` holds $u_{ij} = P(y^{rep}_{ij} \le y_{ij} \mid y_{-j})$ for
every step i and seed j, seed j's curve left out (PSIS weights of the per-seed LOO), with the
Pareto k of each seed. A calibrated model gives $u$ about uniform, so a mean near 0.5 at every
step; a mean curve that misses the data's shape shows as means far from 0.5 (a straight line
through a curved error: high at both ends, low in the middle).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import pickle
import warnings
import zlib
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import NamedTuple

import arviz_base
import arviz_stats  # registers the .azstats accessors
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import xarray as xr
from jax.experimental import multihost_utils
from jax.scipy.special import gammaln
from numpyro.distributions import constraints
from numpyro.infer.hmc import HMCState, hmc
from numpyro.infer.hmc_util import HMCAdaptState
from numpyro.infer.util import constrain_fn, initialize_model, potential_energy

from ._checks import check_size, error_array, integer, number, one_of
from ._diagnostics import rank_diagnostics
from .cache import lower_cached
from .devices import cpu_cores
from .progress import progress_bar

__all__ = [
    "ERROR_MODELS",
    "ErrorModel",
    "fit_error_model",
    "fit_error_models",
    "compare_error_models",
    "curve_quantiles",
    "model_name",
    "PPC_ALPHA",
    "R_HAT_MAX",
]

R_HAT_MAX = 1.01
PPC_ALPHA = 0.05
GP_AMPLITUDE = 1.0
_GRID = 401
_OBS = "log_error"


# long names of the sampled parameters (all on the log-error scale, x = centred log step)
_PARAMETERS = {
    "c": "log error at the mean log step (intercept)",
    "alpha": "power-law exponent: slope of log error against log step",
    "beta": "slope of the least-squares line of the curve (log-log)",
    "h_raw": "curvature coordinates of the GP term (standard normal, non-centred)",
    "a": "log of the discretization term A step^p at the largest step",
    "p": "exponent p of the discretization term A step^p",
    "b": "log of the learning term B step^-q at the smallest step",
    "q": "exponent q of the learning term B step^-q",
    "sigma": "noise scale of the log error",
    "tau": "scale of the seed effect on the log error",
    "nu": "degrees of freedom of the Student-t noise",
}


# ------------------------------------------------------------------ mean curves
def _xp(th):
    return jnp if isinstance(next(iter(th.values())), jax.Array) else np


def _power_prior(g, x):
    return {
        "c": numpyro.sample("c", dist.Normal(0.0, 10.0).expand([g]).to_event(1)),
        "alpha": numpyro.sample("alpha", dist.Normal(0.0, 5.0).expand([g]).to_event(1)),
    }


def _power_curve(th, x, xnew):
    return th["c"][..., None] + th["alpha"][..., None] * xnew


def _two_prior(g, x):
    normal = dist.Normal(0.0, 10.0).expand([g]).to_event(1)
    return {
        "a": numpyro.sample("a", normal),
        "p": numpyro.sample("p", dist.Gamma(2.0, 1.0).expand([g]).to_event(1)),
        "b": numpyro.sample("b", normal),
        "q": numpyro.sample("q", dist.HalfNormal(1.5).expand([g]).to_event(1)),
    }


def _two_curve(th, x, xnew):
    # anchored where each term is best seen (the discretization term at the largest step,
    # the learning term at the smallest): a and b are then nearly uncorrelated with p and q
    up = th["a"][..., None] + th["p"][..., None] * (xnew - x.max())
    return _xp(th).logaddexp(up, th["b"][..., None] - th["q"][..., None] * (xnew - x.min()))


def _kernel(xa, xb, span):
    """GP_AMPLITUDE^2 exp(-(a - b)^2 / (2 ell^2)), ell = span / 3 (numpy)."""
    d = xa[:, None] - xb[None, :]
    return GP_AMPLITUDE**2 * np.exp(-0.5 * d**2 / (span / 3) ** 2)


def _gp_prior(g, x):
    return {
        "c": numpyro.sample("c", dist.Normal(0.0, 10.0).expand([g]).to_event(1)),
        "beta": numpyro.sample("beta", dist.Normal(0.0, 5.0).expand([g]).to_event(1)),
        "h_raw": numpyro.sample("h_raw", dist.Normal(0.0, 1.0).expand([g, x.size - 2]).to_event(2)),
    }


def _gp_curve(th, x, xnew):
    """c + beta xnew + W h_raw. With K the kernel matrix at x and L its Cholesky factor,
    h = L z (z ~ N(0, I_S)) are the GP values at x; the curve is their conditional mean at
    xnew minus their least-squares line, i.e. linear in z through A = (K(xnew, x) K^-1 -
    line operator) L, which ignores the 2 directions of z that only move the line. z is
    sampled in the S - 2 directions that matter (right singular vectors V of A at x; the
    induced prior of the curve is the same), so no parameter is left unidentified.
    The kernel is fixed: a handful of studied steps cannot identify its amplitude and length
    scale, and sampling them makes a funnel that costs NUTS about 20 times more steps."""
    x, xnew = np.asarray(x, float), np.asarray(xnew, float)
    span, xc = float(x.max() - x.min()), x - x.mean()
    k = _kernel(x, x, span) + 1e-6 * np.eye(x.size)
    chol, k_inv = np.linalg.cholesky(k), np.linalg.inv(k)

    def op(xn):
        line = 1.0 / x.size + np.outer(xn - x.mean(), xc) / (xc @ xc)
        return (_kernel(xn, x, span) @ k_inv - line) @ chol

    v = np.linalg.svd(op(x))[2][: x.size - 2].T  # (S, S - 2)
    w = op(xnew) @ v  # (n, S - 2)
    # a product and a sum, not a matmul: its round-off is then the same in every batch shape
    # (a batched dot does not promise that, and NUTS amplifies round-off)
    h = (th["h_raw"][..., None, :] * w).sum(-1)
    return th["c"][..., None] + th["beta"][..., None] * xnew + h


@dataclasses.dataclass(frozen=True)
class ErrorModel:
    """A mean curve m_g(x) of log error against centred log step (see the module docstring).

    `prior(n_groups, x)` samples the curve's parameters (NumPyro sites with a leading group
    axis); `curve(theta, x, xnew)` evaluates m at `xnew` (shape (n,)) for parameters with any
    leading batch axes, as jax or numpy arrays; `x` (shape (S,)) are the studied centred log
    steps. Returns shape (*batch, n)."""

    name: str
    formula: str
    prior: Callable
    curve: Callable


ERROR_MODELS = {
    m.name: m
    for m in (
        ErrorModel("power_law", "log e = c + alpha x", _power_prior, _power_curve),
        ErrorModel(
            "two_term",
            "log e = log(exp(a + p (x - x_max)) + exp(b - q (x - x_min))), p > 0, q >= 0",
            _two_prior,
            _two_curve,
        ),
        ErrorModel(
            "gp",
            "log e = c + beta x + h(x), h ~ GP(0, eta^2 exp(-(x - x')^2 / (2 ell^2)))",
            _gp_prior,
            _gp_curve,
        ),
    )
}


# names of earlier versions (files written before the GP model was renamed hold
# ``error_models/smooth``): accepted as arguments, mapped to today's name
ALIASES = {"smooth": "gp"}


def model_name(name: str, value) -> str:
    """The built-in error model `value` names (an old name in `ALIASES` is mapped); `name` is
    the argument's name for the error message."""
    if isinstance(value, str) and value in ALIASES:
        return ALIASES[value]
    return one_of(name, value, tuple(ERROR_MODELS))


def curve_quantiles(curve: xr.Dataset) -> xr.Dataset:
    """A fit's ``curve`` group with today's variable names (``q05``, ``q50``, ``q95``; files
    of earlier versions call them ``low``, ``median``, ``high``, and ``median`` is shadowed by
    `xarray.Dataset.median`)."""
    old = {"low": "q05", "median": "q50", "high": "q95"}
    return curve.rename({k: v for k, v in old.items() if k in curve.data_vars})


class _SeedCurveLaw(dist.Distribution):
    r"""Multivariate Student-t on $\mathbb R^S$ with the seed-effect scale matrix
    $\Sigma = \sigma^2 I + \tau^2 \mathbf 1 \mathbf 1^T$, in closed form: with
    $r = y - \mu$, $\det\Sigma = \sigma^{2(S-1)}(\sigma^2 + S\tau^2)$ and
    $r^T\Sigma^{-1}r = (\lVert r\rVert^2 - \tau^2 (\mathbf 1^T r)^2 / (\sigma^2 + S\tau^2))
    / \sigma^2$,
    $$\log p(y) = \log\Gamma(\tfrac{\nu+S}2) - \log\Gamma(\tfrac\nu2) - \tfrac S2\log(\nu\pi)
    - \tfrac12\log\det\Sigma - \tfrac{\nu+S}2\log(1 + r^T\Sigma^{-1}r/\nu).$$
    Equal to ``numpyro.distributions.MultivariateStudentT`` with that scale matrix (tested),
    without its Cholesky factor and triangular solves: elementwise arithmetic, which NUTS's
    vectorised lanes run about 3 times faster on a CPU. Draws: $\mu + (\sigma z + \tau e
    \mathbf 1)/\sqrt w$, $z \sim N(0, I_S)$, $e \sim N(0, 1)$, $w \sim \chi^2_\nu/\nu$.

    `df`, `sigma`, `tau` (batch shape) and `loc` (batch shape + (S,)) broadcast together."""

    arg_constraints = {
        "df": constraints.positive,
        "loc": constraints.real_vector,
        "sigma": constraints.positive,
        "tau": constraints.positive,
    }
    support = constraints.real_vector
    reparametrized_params = ["loc", "sigma", "tau"]

    def __init__(self, df, loc, sigma, tau, *, validate_args=None):
        batch = jax.lax.broadcast_shapes(*(jnp.shape(a) for a in (df, sigma, tau)), loc.shape[:-1])
        self.df, self.sigma, self.tau = (jnp.broadcast_to(a, batch) for a in (df, sigma, tau))
        self.loc = jnp.broadcast_to(loc, batch + loc.shape[-1:])
        super().__init__(batch, loc.shape[-1:], validate_args=validate_args)

    def log_prob(self, value):
        s = self.event_shape[0]
        r = value - self.loc
        s2, t2, nu = self.sigma**2, self.tau**2, self.df
        big = s2 + s * t2
        quad = ((r**2).sum(-1) - t2 * r.sum(-1) ** 2 / big) / s2
        log_det = (s - 1) * jnp.log(s2) + jnp.log(big)
        norm = gammaln((nu + s) / 2) - gammaln(nu / 2) - s / 2 * jnp.log(nu * jnp.pi)
        return norm - log_det / 2 - (nu + s) / 2 * jnp.log1p(quad / nu)

    def sample(self, key, sample_shape=()):
        k_z, k_e, k_w = jax.random.split(key, 3)
        shape = tuple(sample_shape) + self.batch_shape
        z = jax.random.normal(k_z, shape + self.event_shape)
        e = jax.random.normal(k_e, shape)[..., None]
        w = jax.random.gamma(k_w, self.df / 2, shape) / (self.df / 2)
        return self.loc + (self.sigma[..., None] * z + self.tau[..., None] * e) / jnp.sqrt(
            w[..., None]
        )


def _seed_law(mean, sigma, tau, nu):
    """Law of one seed's log errors at the S steps: `_SeedCurveLaw` with location `mean`
    (..., S); batch shape (..., 1) (broadcast over seeds)."""
    return _SeedCurveLaw(nu[..., None], mean[..., None, :], sigma[..., None], tau[..., None])


@jax.jit
def _predictive(mean, sigma, tau, nu, y_seed, key):
    """Per-seed log likelihood (N, G, J) of the observed curves `y_seed` (G, J, S) and one
    replicated data set (N, G, J, S) per posterior draw; one compiled program."""
    law = _seed_law(mean, sigma, tau, nu)
    return law.log_prob(y_seed), law.expand([*sigma.shape, y_seed.shape[1]]).sample(key)


def _program(model: ErrorModel, x: np.ndarray, n_groups: int, n_seed: int, y=None):
    """The NumPyro program: x (S,) centred log steps (concrete); y (G, J, S) log errors."""
    g = n_groups
    theta = model.prior(g, x)
    mean = model.curve(theta, x, x)  # (G, S)
    half = dist.HalfNormal(1.0).expand([g]).to_event(1)
    sigma, tau = numpyro.sample("sigma", half), numpyro.sample("tau", half)
    nu = numpyro.sample("nu", dist.Gamma(2.0, 0.1).expand([g]).to_event(1))
    numpyro.sample(_OBS, _seed_law(mean, sigma, tau, nu).expand([g, n_seed]), obs=y)


# ------------------------------------------------------------------ fitting
def _dims(groups, tail):
    return ("chain", "draw", *groups, *tail)


def _options(chains=4, warmup=500, draws=1000, seed=0, min_ess=400, target_accept=0.9) -> dict:
    """The NUTS settings of `fit_error_model`, validated by name."""
    return {
        "chains": integer("chains", chains, ge=2),  # r_hat needs several chains
        "warmup": integer("warmup", warmup),
        "draws": integer("draws", draws, ge=10),
        "seed": integer("seed", seed, ge=0, lt=2**32),
        "min_ess": integer("min_ess", min_ess),
        "target_accept": number("target_accept", target_accept, gt=0, lt=1),
    }


def fit_error_model(
    errors: xr.DataArray,
    model: str = "two_term",
    *,
    chains: int = 4,
    warmup: int = 500,
    draws: int = 1000,
    seed: int = 0,
    min_ess: int = 400,
    target_accept: float = 0.9,
    refits: int = 0,
) -> xr.DataTree:
    """Fit one error model (``"power_law"``, ``"two_term"`` or ``"gp"``) with NUTS.

    `errors`: positive errors with dims (..., step, seed), other dims index groups. Every
    group is its own posterior: `chains` NUTS chains per group, all groups' chains in one
    compiled program (vectorised lanes), each group's random numbers from `seed` and the
    group's coordinates, so a group fitted alone gives the draws it gets among others at the
    same settings. **Refits:** when some group has not converged (r_hat above `R_HAT_MAX` or
    bulk ESS below `min_ess` on any parameter or reported quantity, or a divergent
    transition), every chain is continued to twice its length (its draws so far kept; no
    further adaptation), at most `refits` times (at most 2^refits x `draws` per chain;
    default 0: no refit, the cost is what was asked for; the estimation study refits once).
    Continuing costs no new warm-up and no new program: warm-up, draws and refits are calls
    of one compiled NUTS program per model. The tree's attrs ``refits`` and
    ``refit_history`` say what was done.
    **Returns:** a DataTree in ArviZ's layout (see the module docstring); ``checks`` holds per
    group `r_hat_max`, `ess_bulk_min`, `divergences`, `ppc_p_value`, `ppc_rejected`, `usable`
    and `reason`.
    """
    model = model_name("model", model)
    kwargs = dict(chains=chains, warmup=warmup, draws=draws, seed=seed, min_ess=min_ess)
    kwargs |= dict(target_accept=target_accept)
    return fit_error_models(errors, (model,), refits=refits, **kwargs)[model]


class _Run:
    """One model's NUTS fit as calls of its `iterate` program (see `_sampler`), each `chunk`
    iterations of every chain: `draws()` runs the warm-up and the first `draws` iterations,
    each `more()` continues every chain by `draws` iterations, calling `tick(chunk)` after
    each call; `tree()` is the fitted tree of all the draws so far."""

    def __init__(self, iterate, lane_y, states, chunk: int, calls: tuple, finish):
        self.iterate, self.lane_y, self.states, self.chunk = iterate, lane_y, states, chunk
        self.warmup_calls, self.draw_calls = calls
        self._finish, self.outputs = finish, []

    def draws(self, tick=lambda n: None):
        for _ in range(self.warmup_calls):
            self.states = self.iterate(self.lane_y, self.states)[0]
            tick(self.chunk)
        self.more(tick)

    def more(self, tick=lambda n: None):
        for _ in range(self.draw_calls):
            self.states, *out = self.iterate(self.lane_y, self.states)
            self.outputs.append(jax.device_get(out))
            tick(self.chunk)

    def tree(self) -> xr.DataTree:
        return self._finish(self.outputs)


def _lower(errors, model: str, options: dict, device=None) -> _Run:
    """`_plan`, then compile both programs and start the chains (`_start`)."""
    plan = _plan(errors, model, options, device)
    return _start(plan, *(lowered.compile() for lowered in plan.programs))


class _Plan(NamedTuple):
    """One model's NUTS programs, traced and lowered but not compiled, and their inputs."""

    programs: tuple  # (start, iterate): `jax.stages.Lowered`
    lane_y: jax.Array
    keys: jax.Array
    chunk: int
    calls: tuple  # (warm-up calls, draw calls)
    finish: Callable


def _start(plan: _Plan, start, iterate) -> _Run:
    """The `_Run` of `plan` with its compiled programs; computes the chains' initial states."""
    states = start(plan.lane_y, plan.keys)
    return _Run(iterate, plan.lane_y, states, plan.chunk, plan.calls, plan.finish)


def _plan(errors, model: str, options: dict, device=None) -> _Plan:
    """Validate, build and lower one model's NUTS programs on `device` (a CPU device; default
    the first). NumPyro's tracing (not thread-safe) happens here; compiling the programs and
    the `_Run`'s calls may be threaded."""
    model = model_name("model", model)
    if not jax.config.jax_enable_x64:
        raise ValueError(
            'error models run in float64: call jax.config.update("jax_enable_x64", True) first'
        )
    da = error_array(errors, min_values=3)  # (*groups, step, seed)
    spec = ERROR_MODELS[model]
    groups = list(da.dims[:-2])
    g = int(np.prod([da.sizes[d] for d in groups], dtype=int))
    log_steps = np.log(np.asarray(da["step"].values, float))
    x = log_steps - log_steps.mean()
    y = np.log(np.asarray(da.values, float)).reshape(g, x.size, da.sizes["seed"])
    warmup, draws, chains = options["warmup"], options["draws"], options["chains"]
    chunk = math.gcd(warmup, draws)
    start, iterate = _sampler(
        model, tuple(x), da.sizes["seed"], warmup, chunk, options["target_accept"]
    )
    # lanes: (group, chain) pairs, padded to a multiple of _LANES by repeating the last one
    keys = jax.vmap(lambda k: jax.random.split(k, chains))(
        _group_keys(da, groups, options["seed"])
    ).reshape(-1)
    lane_y = np.repeat(np.swapaxes(y, -1, -2), chains, axis=0)[:, None]  # (G x chains, 1, J, S)
    pad = -keys.shape[0] % _LANES
    keys = jnp.concatenate([keys, jnp.repeat(keys[-1:], pad)])
    lane_y = np.concatenate([lane_y, np.repeat(lane_y[-1:], pad, axis=0)])
    # NUTS on these small models is latency-bound: the host CPU beats an accelerator
    lane_y, keys = jax.device_put(
        (jnp.asarray(lane_y), keys),
        jax.local_devices(backend="cpu")[0] if device is None else device,
    )
    fingerprint = _fingerprint(model, x, options)
    begin = lower_cached(start, (lane_y, keys), name=f"nuts_start_{model}", fingerprint=fingerprint)
    states = begin.out_info  # the iterate program's state argument (shapes and dtypes)
    programs = (
        begin,
        lower_cached(iterate, (lane_y, states), name=f"nuts_{model}", fingerprint=fingerprint),
    )

    def finish(outputs: list) -> xr.DataTree:
        def unflat(a):  # (L, ...) -> (G, chains, ...)
            return np.asarray(a)[: g * chains].reshape(g, chains, *a.shape[1:])

        def joined(part: int, key: str):  # every call's draws: (G, chains, calls x chunk, ...)
            return np.concatenate([unflat(out[part][key]) for out in outputs], axis=2)

        samples = {k: joined(0, k)[:, :, :, 0] for k in outputs[0][0]}  # no group axis
        extra = {k: joined(1, k) for k in outputs[0][1]}
        total = options | {"draws": chunk * len(outputs)}
        return _finish(da, spec, model, groups, x, log_steps, y, samples, extra, total)

    return _Plan(programs, lane_y, keys, chunk, (warmup // chunk, draws // chunk), finish)


@functools.cache
def _source_hash() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def _fingerprint(model: str, x: np.ndarray, options: dict) -> str:
    """What a model's NUTS program is built from: this module's source, NumPyro's version,
    the model, the steps and the NUTS settings (see `mcm_prob.cache.lower_cached`)."""
    warmup, draws = options["warmup"], options["draws"]
    run = [warmup, math.gcd(warmup, draws), options["target_accept"]]
    return f"{_source_hash()}|numpyro {numpyro.__version__}|{model}|{x.tolist()}|{run}"


def _group_keys(da: xr.DataArray, groups: list[str], seed: int) -> jax.Array:
    """One key per group, from `seed` and the group's own coordinates (the values, at that
    group, of every coordinate whose dims are group dims, scalar coordinates included): a group
    fitted alone (selected from a larger array) gets the key it gets in the batch. A group dim
    without a coordinate contributes the group's position along it."""
    names = sorted(n for n, c in da.coords.items() if set(c.dims) <= set(groups))
    bare = [d for d in groups if d not in da.coords]
    keys = []
    for idx in np.ndindex(*(da.sizes[d] for d in groups)):
        at = dict(zip(groups, idx, strict=True))
        ident = {
            n: str(da.coords[n].isel({d: at[d] for d in da.coords[n].dims}).values.item())
            for n in names
        } | {f"position along {d}": str(at[d]) for d in bare}
        text = json.dumps(ident, sort_keys=True)
        keys.append(jax.random.fold_in(jax.random.key(seed), zlib.crc32(text.encode())))
    return jnp.stack(keys)


@functools.lru_cache(maxsize=32)
def _sampler(name: str, x: tuple, n_seed: int, warmup: int, chunk: int, target_accept: float):
    """The jitted NUTS programs of every (group, chain) lane: ``start(lane_y, lane_keys)``
    with the lanes' log errors (L, 1, J, S) and keys (L,) returns the chains' initial states,
    and ``iterate(lane_y, states)`` runs `chunk` NUTS iterations of every chain (adapting
    while a chain is within its first `warmup`) and returns the new states, the constrained
    draws {site: (L, chunk, ...)} (site shapes with the program's group axis of 1) and the
    sampler statistics (L, chunk). Warm-up, draws and continued chains (refits) are calls of
    the one `iterate` program. Each lane is NumPyro's NUTS on the one-group program, with its
    own initialisation (`init_to_uniform`), step-size and diagonal mass-matrix adaptation:
    groups are independent posteriors, not one joint one. The lanes are one flat vmapped axis
    padded (by the caller) to a multiple of `_LANES`, so that fits of different group counts
    share one program and a group's arithmetic does not depend on how many others run beside
    it: XLA's CPU code handles a partly filled vector of lanes differently (other round-off),
    and NUTS amplifies round-off into different draws.
    Cached by its settings: fits of the same model and shapes in one process share the
    traced and compiled programs (tracing the vmapped NUTS loop costs seconds)."""
    spec, x = ERROR_MODELS[name], np.asarray(x)

    def model(y=None):
        return _program(spec, x, 1, n_seed, y)

    @jax.jit
    def potential(params, y):  # traced once: NUTS's nested loops call it many times
        return potential_energy(model, (), {"y": y}, params)

    def kernel(y, init_params, key):
        init_kernel, sample_kernel = hmc(
            potential_fn_gen=lambda y: functools.partial(potential, y=y), algo="NUTS"
        )
        kw = dict(target_accept_prob=target_accept, model_kwargs={"y": y}, rng_key=key)
        return init_kernel(init_params, warmup, **kw), sample_kernel

    def lane_start(y, key):  # y (1, J, S): one chain of one group
        k_model, k_run = jax.random.split(key)
        info = initialize_model(k_model, model, dynamic_args=True, model_kwargs={"y": y})
        return _flat_state(kernel(y, info.param_info, k_run)[0])

    def lane_iterate(y, flat):
        state = _state(flat)
        # a kernel set up as `lane_start`'s was (its settings live in the kernel's closure;
        # the state it builds is unused); the adaptation's progress is in `state`
        _, sample_kernel = kernel(y, state.z, state.rng_key)

        def step(st, _):
            st = sample_kernel(st, model_kwargs={"y": y})
            return st, (st.z, st.diverging, st.num_steps, st.accept_prob, st.energy)

        state, (z, *stats) = jax.lax.scan(step, state, length=chunk)
        samples = jax.vmap(lambda u: constrain_fn(model, (), {"y": y}, u))(z)
        return _flat_state(state), samples, dict(zip(_STATS, stats, strict=True))

    return jax.jit(jax.vmap(lane_start)), jax.jit(jax.vmap(lane_iterate))


def _flat_state(state) -> tuple:
    """A NUTS state as nested plain tuples (namedtuples cannot be exported)."""
    return tuple(tuple(f) if isinstance(f, HMCAdaptState) else f for f in state)


def _state(flat: tuple) -> HMCState:
    """The NUTS state of `_flat_state`'s tuples."""
    return HMCState(
        *(
            HMCAdaptState(*f) if n == "adapt_state" else f
            for n, f in zip(HMCState._fields, flat, strict=True)
        )
    )


_LANES = 8  # float64 lanes of a 512-bit vector
_STATS = ("diverging", "num_steps", "accept_prob", "energy")


def _finish(da, spec, model, groups, x, log_steps, y, samples, extra, options):
    """The ArviZ-layout tree of a fit from its draws (see `fit_error_model`)."""
    chains, warmup, draws, seed, min_ess, target_accept = options.values()
    gshape = tuple(da.sizes[d] for d in groups)
    g, n_step, n_seed = y.shape
    n = chains * draws
    # (G, chains, draws, ...) -> (N, G, ...), N = chains x draws, chain-major
    th = {
        k: np.moveaxis(np.asarray(v, np.float64).reshape(g, n, *v.shape[3:]), 0, 1)
        for k, v in samples.items()
    }

    # pointwise (per seed) log likelihood, replicated data and the seed effects' conditional
    # means E[u_j | y_j, theta] = tau^2 / (sigma^2 + S tau^2) sum_i (y_ij - m_i)
    mean = spec.curve(th, x, x)  # (N, G, S)
    y_seed = np.swapaxes(y, -1, -2)  # (G, J, S)
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        loglik, y_rep = (
            np.asarray(a)  # (N, G, J) and (N, G, J, S)
            for a in _predictive(
                *(jnp.asarray(a) for a in (mean, th["sigma"], th["tau"], th["nu"], y_seed)),
                jax.random.key(seed + 1),
            )
        )
    resid = y_seed[None] - mean[:, :, None, :]  # (N, G, J, S)
    shrink = th["tau"] ** 2 / (th["sigma"] ** 2 + n_step * th["tau"] ** 2)
    seed_effect = shrink[..., None] * resid.sum(-1)  # (N, G, J)

    # posterior predictive check: the shape of the mean residual curve over steps
    def discrepancy(r):
        rbar = r.mean(-2)  # mean over seeds: (N, G, S)
        return ((rbar - rbar.mean(-1, keepdims=True)) ** 2).sum(-1)

    p_value = (discrepancy(y_rep - mean[:, :, None, :]) >= discrepancy(resid)).mean(0)
    y_rep = np.swapaxes(y_rep, -1, -2)  # (N, G, S, J)

    # derived quantities on the typical-seed curve
    grid = np.linspace(x[0], x[-1], _GRID)
    rate, small, large, dstar, emin, band, log_band = [], [], [], [], [], [], []
    eps = 1e-4 * (x[-1] - x[0])
    for k in range(g):
        tk = {name: v[:, k] for name, v in th.items()}
        m_grid = spec.curve(tk, x, grid)  # (N, GRID)
        m_x = spec.curve(tk, x, x)
        rate.append((spec.curve(tk, x, x + eps) - spec.curve(tk, x, x - eps)) / (2 * eps))
        small.append((m_x[:, 1] - m_x[:, 0]) / (x[1] - x[0]))
        large.append((m_x[:, -1] - m_x[:, -2]) / (x[-1] - x[-2]))
        arg = m_grid.argmin(-1)
        dstar.append(np.exp(grid[arg] + log_steps.mean()))
        emin.append(np.exp(m_grid[np.arange(n), arg]))
        band.append(np.quantile(np.exp(m_grid[:, ::4]), [0.05, 0.5, 0.95], axis=0))
        log_band.append(m_grid[:, ::4])

    def shaped(arr, tail=()):  # (N, G, *tail) -> (chains, draws, *gshape, *tail)
        return np.asarray(arr).reshape(chains, draws, *gshape, *tail)

    posterior = {}
    for name, v in th.items():
        tail = ("curvature_basis",) if name == "h_raw" else ()
        long_name = {"long_name": _PARAMETERS[name]}
        posterior[name] = (_dims(groups, tail), shaped(v, v.shape[2:]), long_name)
    derived = {
        "seed_effect": (
            seed_effect,
            ("seed",),
            "seed effect E[u_j | y_j] (integrated out in the likelihood)",
        ),
        "local_rate": (np.stack(rate, 1), ("step",), "local rate d log e / d log step"),
        "rate_small": (np.stack(small, 1), (), "secant log-log slope over the two smallest steps"),
        "rate_large": (np.stack(large, 1), (), "secant log-log slope over the two largest steps"),
        "delta_star": (np.stack(dstar, 1), (), "error-minimising step in the studied range"),
        "error_min": (np.stack(emin, 1), (), "typical-seed error at delta_star"),
    }
    coords = {d: da[d] for d in (*groups, "step", "seed")}
    post = xr.Dataset(posterior, coords=coords)
    for name, (arr, tail, long_name) in derived.items():
        post[name] = (_dims(groups, tail), shaped(arr, arr.shape[2:]), {"long_name": long_name})
    post = post.assign_coords(chain=np.arange(chains), draw=np.arange(draws))
    # convergence judged on the parameters and on everything reported from them: the
    # derived quantities and the curve band (log m on the band's grid). Not judged: seed
    # effects (per-seed nuisance values, never reported) and delta_star, an argmin on a grid
    # that is often the same grid point in a whole chain (r_hat then undefined): it is the
    # minimiser of the judged curve, and error_min, its value, is judged
    judged = post.drop_vars(["seed_effect", "delta_star"])
    judged["log_curve"] = (
        _dims(groups, ("step_grid",)),
        shaped(np.stack(log_band, 1), (len(grid[::4]),)),
    )
    r_hat_max, ess_min, worst = _convergence(judged, tuple(groups))

    stats = {
        "diverging": ("diverging", bool, "divergent transition"),
        "n_steps": ("num_steps", None, "leapfrog steps of the NUTS trajectory"),
        "acceptance_rate": ("accept_prob", float, "mean acceptance probability of the trajectory"),
        "energy": ("energy", float, "Hamiltonian energy"),
    }
    sample_stats = xr.Dataset(  # per group: each group has its own chains
        {
            name: (
                _dims(groups, ()),
                np.moveaxis(np.asarray(extra[field], dtype), 0, -1).reshape(chains, draws, *gshape),
                {"long_name": long_name},
            )
            for name, (field, dtype, long_name) in stats.items()
        },
        coords={d: da[d] for d in groups} | {"chain": np.arange(chains), "draw": np.arange(draws)},
    )
    obs_dims = _dims(groups, ("step", "seed"))
    obs_coords = coords | {"chain": np.arange(chains), "draw": np.arange(draws)}
    loglik_ds = xr.Dataset(
        {_OBS: (_dims(groups, ("seed",)), shaped(loglik, (n_seed,)))},
        coords=coords | {"chain": np.arange(chains), "draw": np.arange(draws)},
    )
    loglik_ds[_OBS].attrs["long_name"] = "log likelihood of each seed's whole error curve"
    # replicated log errors in float32 (7 digits are plenty for draws; halves the file)
    pp_ds = xr.Dataset(
        {_OBS: (obs_dims, shaped(y_rep, (n_step, n_seed)).astype(np.float32))}, coords=obs_coords
    )
    pp_ds[_OBS].attrs["long_name"] = "replicated log error (posterior predictive draw)"
    observed = xr.Dataset(
        {_OBS: ((*groups, "step", "seed"), y.reshape(*gshape, n_step, n_seed))}, coords=coords
    )
    observed[_OBS].attrs["long_name"] = "log of the observed error"

    gdims = tuple(groups)
    divergent = sample_stats["diverging"].sum(("chain", "draw"))
    p_da = xr.DataArray(p_value.reshape(gshape), dims=gdims, coords={d: da[d] for d in groups})
    rejected = p_da < PPC_ALPHA
    reasons = np.empty(gshape, object)
    usable = np.empty(gshape, bool)
    for idx in np.ndindex(*gshape):
        why = []
        if bool(rejected.values[idx]):
            why.append(
                f"posterior predictive check rejects it (p = {float(p_da.values[idx]):.3f} < {PPC_ALPHA})"
            )
        if not float(r_hat_max.values[idx]) <= R_HAT_MAX:  # 4 digits: 1.0105 is not 1.01
            why.append(f"r_hat {float(r_hat_max.values[idx]):.4f} > {R_HAT_MAX} ({worst[0][idx]})")
        if not float(ess_min.values[idx]) >= min_ess:
            why.append(f"bulk ESS {float(ess_min.values[idx]):.0f} < {min_ess} ({worst[1][idx]})")
        if int(divergent.values[idx]):
            why.append(f"{int(divergent.values[idx])} divergent transitions")
        reasons[idx], usable[idx] = "; ".join(why) or "ok", not why
    checks = xr.Dataset(
        {
            "ppc_p_value": (
                gdims,
                p_da.values,
                {"long_name": "posterior predictive p-value of the squared mean residual per step"},
            ),
            "ppc_rejected": (
                gdims,
                rejected.values,
                {"long_name": f"predictive check rejects the model (p < {PPC_ALPHA})"},
            ),
            "r_hat_max": (
                gdims,
                r_hat_max.values,
                {
                    "long_name": "largest rank-normalised split r_hat of the group's parameters "
                    "and reported quantities (rates, error_min, curve band)"
                },
            ),
            "ess_bulk_min": (
                gdims,
                ess_min.values,
                {
                    "long_name": "smallest bulk ESS of the group's parameters and reported quantities"
                },
            ),
            "divergences": (
                gdims,
                divergent.values,
                {"long_name": "divergent transitions in the group's chains"},
            ),
            "usable": (
                gdims,
                usable,
                {"long_name": "check passed, diagnostics clean: numbers may be reported"},
            ),
            "reason": (
                gdims,
                reasons.astype(str),
                {"long_name": "why not usable ('ok' when usable)"},
            ),
        },
        coords={d: da[d] for d in groups},
    )
    step_grid = np.exp(grid[::4] + log_steps.mean())
    band = np.stack(band, 0)  # (G, 3, n)
    curve = xr.Dataset(
        {
            q: (
                (*gdims, "step_grid"),
                band[:, i].reshape(*gshape, -1),
                {"long_name": f"{label} of exp(m) (typical-seed error)"},
            )
            for i, (q, label) in enumerate(
                (("q05", "5% quantile"), ("q50", "median"), ("q95", "95% quantile"))
            )
        },
        coords={d: da[d] for d in groups}
        | {"step_grid": ("step_grid", step_grid, {"long_name": "discretization step Delta"})},
    )
    attrs = {
        "error_model": model,
        "formula": spec.formula
        + " (+ seed effect tau z + Student-t noise; x = log step - mean log step)",
        "sampler": f"NUTS (NumPyro {numpyro.__version__}), per group {chains} chains x {draws} draws after {warmup} warm-up (own step size and diagonal mass matrix), target_accept {target_accept}, seed {seed} (group keys: seed and the group's coordinates)",
        "divergences": int(divergent.sum()),
        "ppc_rule": f"rejected when P(D(y_rep) >= D(y)) < {PPC_ALPHA}, D = sum over steps of the squared mean residual over seeds",
        "usable_rule": f"not rejected, r_hat <= {R_HAT_MAX}, bulk ESS >= {min_ess}, no divergences",
        "mean_log_step": float(log_steps.mean()),
        "min_ess": min_ess,
        "arviz": f"arviz-base {arviz_base.__version__}, arviz-stats {arviz_stats.__version__}",
    }
    tree = xr.DataTree.from_dict(
        {
            "/": xr.Dataset(attrs=attrs),
            "posterior": post,
            "posterior_predictive": pp_ds,
            "log_likelihood": loglik_ds,
            "sample_stats": sample_stats,
            "observed_data": observed,
            "checks": checks,
            "curve": curve,
        }
    )
    tree["loo_pit"] = _loo_pit(tree)
    return tree


def _convergence(post: xr.Dataset, groups: tuple) -> tuple:
    """Per group: the largest rank-normalised split r_hat and the smallest bulk ESS over every
    variable and element of `post` (arviz-stats's definitions, computed for all elements at
    once by `mcm_prob._diagnostics`), and for each the name of the variable that attains it.
    A quantity that is the same in every draw (a minimiser on the boundary of the step
    range) has converged: r_hat 1, ESS the number of draws."""
    n = post.sizes["chain"] * post.sizes["draw"]
    constant = post.std(("chain", "draw")) == 0
    r_hat, ess = xr.Dataset(), xr.Dataset()
    for name, v in post.data_vars.items():
        v = v.transpose(..., "chain", "draw")
        rows = v.values.reshape(-1, v.sizes["chain"], v.sizes["draw"])
        kept = v.isel(chain=0, draw=0, drop=True)
        r, e = (kept.copy(data=x.reshape(kept.shape)) for x in rank_diagnostics(rows))
        r_hat[name], ess[name] = r, e
    r_hat = r_hat.where(~constant, 1.0)
    ess = ess.where(~constant, float(n))

    def reduce(ds, op):
        per_var = xr.concat(
            [getattr(v, op)([d for d in v.dims if d not in groups]) for v in ds.values()],
            "var",
        ).assign_coords(var=list(ds.data_vars))
        pick = per_var.fillna(np.inf if op == "max" else -np.inf)  # nan r_hat is the worst
        pick = pick.argmax("var") if op == "max" else pick.argmin("var")
        names = np.asarray(per_var["var"].values, dtype=object)
        worst = names[pick.values.reshape(-1)].reshape(pick.shape)  # 0-d array for no groups
        value = per_var.isel(var=pick).drop_vars("var")
        if op == "max":  # a nan r_hat (no spread within chains) must not pass as converged
            value = value.fillna(np.inf)
        return value, worst

    (r_max, r_worst), (e_min, e_worst) = reduce(r_hat, "max"), reduce(ess, "min")
    return r_max, e_min.fillna(0.0), (r_worst, e_worst)


def _loo_pit(tree: xr.DataTree) -> xr.Dataset:
    r"""Leave-one-seed-out PIT of every observed log error, $u_{ij} = P(y^{rep}_{ij} \le y_{ij}
    \mid y_{-j})$: `arviz_stats.loo_pit` with the PSIS weights of the per-seed LOO (the unit
    left out is seed j's whole curve, so its S steps share one set of weights)."""
    with warnings.catch_warnings():  # high Pareto k is stored beside the values
        warnings.simplefilter("ignore", UserWarning)
        loo = arviz_stats.loo(tree, pointwise=True, var_name=_OBS)
        obs = tree["observed_data"][_OBS]
        weights = {
            "log_weights": loo.log_weights.broadcast_like(obs),
            "pareto_k": loo.pareto_k.broadcast_like(obs),
        }
        pit = arviz_stats.loo_pit(
            tree, var_names=_OBS, **{k: xr.Dataset({_OBS: v}) for k, v in weights.items()}
        )[_OBS]
    pit.attrs = {
        "long_name": "leave-one-seed-out PIT of the observed log error, P(y_rep <= y | other seeds)",
        "note": "uniform on [0, 1] for a calibrated model; the steps of one seed share the left-out "
        "curve, so values of a seed are dependent",
    }
    k = loo.pareto_k.transpose(*obs.dims[:-2], "seed")
    k.attrs = {"long_name": "Pareto k of the seed's PSIS weights (PIT unreliable above 0.7)"}
    return xr.Dataset({_OBS: pit.transpose(*obs.dims), "pareto_k": k})


# the built-in models by their NUTS run time on the main job (13 s, 4.3 s, 4.0 s on 2 cores:
# benchmarks/bench_error_models.py): the slowest gets a device of its own
_SLOWEST_FIRST = ("two_term", "gp", "power_law")


def fit_error_models(
    errors: xr.DataArray,
    models=tuple(ERROR_MODELS),
    *,
    workers: int | None = None,
    refits: int = 0,
    progress: bool = False,
    **kwargs,
) -> dict[str, xr.DataTree]:
    """`fit_error_model` for each of `models` (same `kwargs` and `refits`), as
    ``{model: tree}``.

    The models are traced in turn (NumPyro's tracing is not thread-safe), slowest first, and
    each one is compiled while the next is traced and run as soon as it is compiled, side by
    side in `workers` threads (None: one per model); the slowest runs alone
    on the first XLA CPU device, the others on the next ones where there are
    several (`mcm_prob.devices.use_every_cpu_core`; programs on one device run one after the
    other). Models that need a refit are refitted together in the next round. The results
    are those of `fit_error_model` (same programs, same keys). Bad settings or input are
    refused before anything is traced. `progress`: a bar of NUTS iterations per chain (summed
    over the models) on standard error, naming the models compiling or running
    (`mcm_prob.progress`).
    """
    models = tuple(model_name("models", m) for m in models)
    if len(set(models)) != len(models) or not models:
        raise ValueError(f"`models` must be distinct names from {list(ERROR_MODELS)}, got {models}")
    workers = integer("workers", len(models) if workers is None else workers, ge=1)
    refits = integer("refits", refits, ge=0, lt=5)
    options = _options(**kwargs)
    da = error_array(errors, min_values=3)
    groups = int(np.prod([da.sizes[d] for d in da.dims[:-2]], dtype=float))
    per_draw = 3 * da.sizes["step"] * da.sizes["seed"] + 16  # log-likelihood, predictions, params
    kept = groups * options["chains"] * options["draws"] * 2**refits * per_draw * len(models)
    check_size("draws", 8 * kept, f"{kept:,.0f} stored values of the posterior draws")
    if not isinstance(progress, bool):
        raise TypeError(f"`progress` must be True or False, got {progress!r}")
    if jax.process_count() > 1:
        return _spread_over_processes(errors, models, workers, refits, progress, options)
    return _fit_here(errors, models, workers, refits, progress, options)


def _spread_over_processes(errors, models, workers, refits, progress, options) -> dict:
    """A multi-controller run (docs/scaling.md): process i fits models i, i + n, ... and every
    process gets every fit (the trees exchanged between the processes, pickled: they are this
    program's own objects). The fits are those of one process (same programs, same keys)."""
    index, count = jax.process_index(), jax.process_count()
    mine = models[index::count]
    local = _fit_here(errors, mine, workers, refits, progress, options) if mine else {}
    payload = np.frombuffer(pickle.dumps(local), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([payload.size]))).ravel()
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: payload.size] = payload
    every = np.asarray(multihost_utils.process_allgather(padded))
    fits = {}
    for row, size in zip(every, sizes, strict=True):
        fits |= pickle.loads(row[: int(size)].tobytes())
    return {m: fits[m] for m in models}


def _fit_here(errors, models, workers, refits, progress, options) -> dict:
    """`fit_error_models` in this process (validated arguments)."""
    per_model = options["warmup"] + options["draws"]
    desc = "error models, NUTS iterations per chain"
    with progress_bar(len(models) * per_model, desc, enabled=progress) as bar:
        bar.set_postfix_str(f"compiling {', '.join(models)}")
        runs, fits, pending, rounds = {}, {}, list(models), {m: 0 for m in models}
        for r in range(refits + 1):
            if r:
                calls = [_Run.more] * 2 ** (r - 1)  # the chains' length doubles
                bar.total += len(pending) * len(calls) * options["draws"]
                bar.refresh()
                bar.set_postfix_str("continuing " + ", ".join(pending))
            with ThreadPoolExecutor(min(workers, len(pending))) as pool:
                jobs = (
                    {m: pool.submit(_in_turn, runs[m], calls, bar.update) for m in pending}
                    if r
                    else _first_runs(errors, pending, options, pool, bar)
                )
                # each run's checks as soon as it ends, while the others still run; in this
                # thread: warning filters, which arviz-stats and xarray change while they
                # run, are process-global and not thread-safe
                model = {job: m for m, job in jobs.items()}
                for job in as_completed(model):
                    m = model[job]
                    runs[m] = job.result()
                    fits[m], rounds[m] = runs[m].tree(), r
            pending = [m for m in pending if _unconverged(fits[m])]
            if not pending:
                break
        left = f"not converged after {rounds[pending[0]]} refits: {pending}" if pending else ""
        bar.set_postfix_str(left or "converged")
    for m in models:
        lengths = [options["draws"] * 2**r for r in range(rounds[m] + 1)]
        fits[m].attrs["refits"] = rounds[m]
        fits[m].attrs["refit_history"] = (
            f"fitted with {lengths[0]} draws after {options['warmup']} warm-up"
            + "".join(
                f"; not converged in some group, chains continued to {n} draws" for n in lengths[1:]
            )
            + ("; still not converged at the cap" if m in pending else "")
        )
    return {m: fits[m] for m in models}


def _unconverged(tree: xr.DataTree) -> bool:
    """Some group has r_hat or ESS outside the rule or a divergence (what more draws and
    warm-up can cure; a rejected predictive check is not)."""
    checks = tree["checks"].to_dataset()
    min_ess = int(tree.attrs["min_ess"])
    ok = (checks["r_hat_max"] <= R_HAT_MAX) & (checks["ess_bulk_min"] >= min_ess)
    return not bool((ok & (checks["divergences"] == 0)).all())


def _in_turn(run: _Run, calls: list, tick) -> _Run:
    """`calls` (methods of `_Run`) on `run`, one after the other (one worker thread's job)."""
    for call in calls:
        call(run, tick)
    return run


def _first_runs(errors, models, options: dict, pool, bar) -> dict:
    """Each model's first NUTS run (warm-up and draws) as a job of `pool`, ``{model: Future
    of its _Run}``, the stages overlapping: the models are traced in turn in this thread
    (NumPyro's tracing is not thread-safe), slowest first; each one's two programs are
    compiled in threads as soon as it is traced (XLA compiles without the GIL; one thread per
    two cores), and its run starts as soon as both are compiled, so that on 2 cores the
    slowest model runs while the others are traced and compiled. The runs are on spread-out
    CPU devices: the slowest alone on the first, the others on the next ones where there are
    several (one program runs at a time on a device). Same programs, devices and keys as
    one model at a time, so the same draws. Measured: the six programs compiled in 3.6 s
    with six threads against 10.8 s one after the other on a 16-core host, 5 s slower with
    six threads on 2 cores; on 2 cores the overlap took the main job's three models from
    37-39 s to 34 s (`benchmarks/bench_error_models.py --together --entries 2`)."""
    cpus = jax.local_devices(backend="cpu")  # every process fits on its own devices
    jobs = {}
    with ThreadPoolExecutor(max(1, min(2 * len(models), cpu_cores() // 2))) as compiler:
        for i, m in enumerate(sorted(models, key=_SLOWEST_FIRST.index)):
            device = cpus[0 if i == 0 or len(cpus) == 1 else 1 + (i - 1) % (len(cpus) - 1)]
            plan = _plan(errors, m, options, device)
            programs = [compiler.submit(lowered.compile) for lowered in plan.programs]
            jobs[m] = pool.submit(_run_compiled, plan, programs, bar.update)
    bar.set_postfix_str("running " + ", ".join(models))  # every program compiled
    return {m: jobs[m] for m in models}


def _run_compiled(plan: _Plan, programs: list, tick) -> _Run:
    """`plan`'s run once its programs (futures) are compiled: started, then its draws."""
    return _in_turn(_start(plan, *(p.result() for p in programs)), [_Run.draws], tick)


def _check_same_data(fits: Mapping[str, xr.DataTree]) -> None:
    """Refuse fitted trees of different observed errors (LOO ranks fits of one data set)."""
    names = list(fits)
    first = fits[names[0]]["observed_data"][_OBS]
    for name in names[1:]:
        obs = fits[name]["observed_data"][_OBS]
        if not obs.equals(first):
            raise ValueError(
                f"`errors[{name!r}]` was fitted to other errors than `errors[{names[0]!r}]` "
                "(their observed_data differ); LOO compares models of one data set: fit every "
                "model to the same errors"
            )


def compare_error_models(
    errors: xr.DataArray | Mapping[str, xr.DataTree],
    models=tuple(ERROR_MODELS),
    **fit_kwargs,
) -> xr.Dataset:
    """PSIS-LOO comparison of error models (arviz-stats), overall and per group.

    `errors`: the errors (each of `models` is then fitted with `fit_error_model(errors, m,
    **fit_kwargs)`) or a mapping name -> already fitted tree. **Returns:** a Dataset over
    ``model`` with `elpd`, `se`, `p_loo`, `elpd_diff`, `dse`, `weight` (stacking), `rank`,
    `pareto_k_warning` and `n_pareto_k_high` (k > 0.7), and per group `elpd_group`,
    `se_group`; `preferred` per group is the usable model (see `fit_error_model`) with the
    highest group elpd ("" when none is usable). Pareto-k warnings are kept, not silenced.
    """
    names = list(errors) if isinstance(errors, Mapping) else list(models)
    if len(set(names)) < 2:
        raise ValueError(f"`models` must name at least 2 models to compare, got {names}")
    if isinstance(errors, Mapping):
        fits = dict(errors)
        _check_same_data(fits)
    else:
        names = [model_name("models", m) for m in names]
        fits = {m: fit_error_model(errors, m, **fit_kwargs) for m in names}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loos = {m: arviz_stats.loo(fits[m], pointwise=True, var_name=_OBS) for m in names}
        table = arviz_stats.compare(loos)
    table = table.loc[names]
    first = fits[names[0]]["checks"].to_dataset()
    gdims = tuple(first.dims)
    elpd_i = xr.concat([loos[m].elpd_i for m in names], "model")  # per seed curve
    elpd_g = elpd_i.sum("seed")
    se_g = np.sqrt(elpd_i.sizes["seed"] * elpd_i.var("seed"))
    usable = xr.concat([fits[m]["checks"]["usable"] for m in names], "model").values
    score = np.where(usable, elpd_g.transpose("model", ...).values, -np.inf)
    best = np.argmax(score, 0)
    preferred = np.where(np.isfinite(np.max(score, 0)), np.array(names)[best], "")
    khigh = [int((loos[m].pareto_k > 0.7).sum()) for m in names]
    return xr.Dataset(
        {
            "elpd": ("model", table["elpd"].to_numpy(float), {"long_name": "PSIS-LOO elpd"}),
            "se": ("model", table["se"].to_numpy(float), {"long_name": "standard error of elpd"}),
            "p_loo": (
                "model",
                table["p"].to_numpy(float),
                {"long_name": "effective number of parameters"},
            ),
            "elpd_diff": (
                "model",
                table["elpd_diff"].to_numpy(float),
                {"long_name": "elpd of the best model minus this one"},
            ),
            "dse": (
                "model",
                table["dse"].to_numpy(float),
                {"long_name": "standard error of elpd_diff"},
            ),
            "weight": ("model", table["weight"].to_numpy(float), {"long_name": "stacking weight"}),
            "rank": (
                "model",
                table["rank"].to_numpy(int),
                {"long_name": "rank by elpd (0 = best)"},
            ),
            "pareto_k_warning": (
                "model",
                table["warning"].to_numpy(bool),
                {"long_name": "some Pareto k > 0.7: PSIS-LOO unreliable there"},
            ),
            "n_pareto_k_high": (
                "model",
                np.array(khigh),
                {"long_name": "observations with Pareto k > 0.7"},
            ),
            "elpd_group": (
                ("model", *gdims),
                elpd_g.transpose("model", ...).values,
                {"long_name": "PSIS-LOO elpd summed over the group's observations"},
            ),
            "se_group": (
                ("model", *gdims),
                se_g.transpose("model", ...).values,
                {"long_name": "standard error of elpd_group"},
            ),
            "preferred": (
                gdims,
                preferred.astype(str),
                {"long_name": "usable model with the highest group elpd"},
            ),
        },
        coords={"model": ("model", names, {"long_name": "error model"})}
        | {d: first[d] for d in gdims},
        attrs={
            "method": "PSIS-LOO (arviz_stats.loo) per model; arviz_stats.compare with stacking weights",
            "warnings": json.dumps(sorted({str(w.message) for w in caught})),
        },
    )
