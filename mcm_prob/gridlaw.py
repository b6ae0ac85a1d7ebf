r"""Exact sampler laws for product targets, one coordinate at a time on a 1-d grid.

For a target whose coordinates are independent (`UniformBox`, or i.i.d. coordinates each
following a 1-d family such as a 1-d `DiracMixture`), the OU process, the exact flow map and
the re-noising all act coordinate by coordinate, and the sampler starts from N(0, I). So the
sampler's law is the product of 1-d laws and $KL_d = \sum_i KL_1^{(i)}$ exactly: dimension
scaling is measured without estimator noise.

1-d propagation (density of the sampler's state on a grid $x_j$):

* flow $t \to s$: in 1-d the flow map is the monotone transport with
  $p_s(y)\,dy = p_t(x)\,dx$, so the density ratio $r = q/p$ is transported unchanged:
  $r_s(y) = r_t(\Phi_{s\to t}(y))$, evaluated by a forward `pf_flow` of the grid and linear
  interpolation of $r_t$;
* re-noising over a gap g: $q'(x) = \int N(x; \alpha_g y, \sigma_g^2)\, q(y)\,dy$ by trapezoidal
  quadrature, each kernel column renormalised to unit mass on the grid.

The grid is a uniform grid on [-L, L] merged with the images under $\Phi_{10\to\delta}$ of 2000
normal quantiles, which concentrates points where $p_\delta$ has its mass (around Diracs at
small delta). KL is $\int p_\delta\,(r \log r - r + 1)$ by the trapezoidal rule: equal to
$\int q \log(q/p)$ when both integrate to 1, with a non-negative integrand of size
$(r-1)^2/2$, so quadrature errors in the masses do not swamp small KL values.

Accuracy: on 1-d Gaussian data, where the exact law is known, the grid KL agrees with the exact
one to about 1e-10 absolute (n_grid = 4001; tests: relative 1e-3 at KL ~ 1e-6). Values below
about 1e-9 are at this quadrature floor, which grows slowly with the number of steps.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from ._checks import integer
from .data import DataDistribution, UniformBox
from .flow import pf_flow
from .sampling import sampler_times

__all__ = ["GridLaw", "grid_law_1d", "product_kl", "box_factors"]


class GridLaw(NamedTuple):
    """The 1-d sampler law on a grid: points `x`, sampler density `q`, target density `p`
    ($p_\\delta$), `kl` = KL(q || p) and `mass` (integral of q, 1 up to quadrature error)."""

    x: np.ndarray
    q: np.ndarray
    p: np.ndarray
    kl: float
    mass: float


def box_factors(box: UniformBox) -> list[UniformBox]:
    """The 1-d factors of a box: `[UniformBox([low_i], [high_i]) for each coordinate]`; equal
    coordinates share one factor object, so `product_kl` computes their grid law once."""
    bounds = list(zip(np.asarray(box.low).tolist(), np.asarray(box.high).tolist(), strict=True))
    made = {b: UniformBox([b[0]], [b[1]]) for b in set(bounds)}
    return [made[b] for b in bounds]


def _trapezoid_weights(x: np.ndarray) -> np.ndarray:
    w = np.zeros_like(x)
    dx = np.diff(x)
    w[:-1] += dx / 2
    w[1:] += dx / 2
    return w


def _grid(data: DataDistribution, delta: float, n_grid: int, half_width: float) -> np.ndarray:
    u = (np.arange(2000) + 0.5) / 2000
    quantiles = stats.norm.ppf(u)[:, None]
    focused = np.asarray(pf_flow(data, jnp.asarray(quantiles), 10.0, delta))[:, 0]
    x = np.concatenate([np.linspace(-half_width, half_width, n_grid), focused])
    return np.unique(np.round(x, 12))


def _density(data: DataDistribution, x: np.ndarray, t: float) -> np.ndarray:
    return np.exp(np.asarray(data.marginal(t).log_prob(jnp.asarray(x)[:, None])))


def grid_law_1d(
    data: DataDistribution,
    *,
    delta: float,
    h: float,
    steps: int,
    tau: float = 0.0,
    n_grid: int = 4001,
    half_width: float | None = None,
) -> GridLaw:
    """Law of `mcm_prob.sample` with the exact flow for a 1-d family, on a grid (see module doc).

    **Arguments:** `data` with `dim == 1`; the sampler's `delta`, `h`, `steps`, `tau`; `n_grid`
    uniform points on [-half_width, half_width] (default: 8 plus the data's extent).
    """
    if data.dim != 1:
        raise ValueError(f"`data` must be a 1-d family (dim == 1), got dim = {data.dim}")
    integer("n_grid", n_grid, ge=101)
    t, s, gap = sampler_times(delta=delta, h=h, steps=steps, tau=tau)
    if half_width is None:
        extent = np.abs(np.asarray(data.sample(jax.random.key(0), 4096))).max()
        half_width = 8.0 + float(extent)
    x = _grid(data, delta, n_grid, half_width)
    w = _trapezoid_weights(x)
    q = stats.norm.pdf(x)
    for k in range(steps):
        ratio = q / _density(data, x, t[k])
        back = np.asarray(pf_flow(data, jnp.asarray(x)[:, None], s[k], t[k]))[:, 0]
        r_s = np.interp(back, x, ratio)
        p_s = _density(data, x, s[k])
        q = r_s * p_s
        if k < steps - 1 and gap[k] > 0:
            a, sd = math.exp(-gap[k]), math.sqrt(-math.expm1(-2 * gap[k]))
            kernel = stats.norm.pdf(x[:, None], a * x[None, :], sd)
            kernel /= (w[:, None] * kernel).sum(0, keepdims=True)
            q = kernel @ (w * q)
    mass = float(np.sum(w * q))
    with np.errstate(divide="ignore", invalid="ignore"):
        integrand = p_s * np.where(r_s > 0, r_s * np.log(r_s) - r_s + 1, 1.0)
    kl = float(np.sum(w * integrand))
    if not (math.isfinite(kl) and math.isfinite(mass)):
        raise FloatingPointError("grid propagation produced non-finite values; refine the grid")
    return GridLaw(x, q, p_s, kl, mass)


def product_kl(
    factors, *, delta: float, h: float, steps: int, tau: float = 0.0, **grid_kwargs
) -> float:
    """KL(sampler law || p_delta) for a product target with the given 1-d `factors`:
    the sum of the 1-d grid KLs (identical factor objects are computed once)."""
    factors = list(factors)
    if not factors:
        raise ValueError("`factors` must contain at least one 1-d family")
    cache: dict[int, float] = {}
    total = 0.0
    for f in factors:
        if id(f) not in cache:
            cache[id(f)] = grid_law_1d(f, delta=delta, h=h, steps=steps, tau=tau, **grid_kwargs).kl
        total += cache[id(f)]
    return total
