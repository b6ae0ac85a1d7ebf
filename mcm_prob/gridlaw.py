r"""Exact sampler laws on a 1-d grid: 1-d data, and product targets one coordinate at a time.

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
* any consistency function f (a learned net; `f=` in `grid_law_1d`): where f is increasing on
  the grid, change of variables $q_s(f(x)) = q_t(x)/f'(x)$ with f' by autodiff, interpolated
  as the ratio to $p_s$; elsewhere mass transport (each cell's mass moved to f(x_i), split
  between the two neighbouring grid points). Accuracy: with f the closed-form Gaussian flow it
  reproduces the exact-flow grid law to 1e-12; with an ODE flow its derivatives are those of
  the solver (1e-4 relative on a Dirac mixture); for a fitted net it matches a 10^6-sample
  histogram of `sample` (tests);
* without ODE solves (`grid_kl_cdf`, a differentiable JAX function of the times, used to
  optimise schedules): in 1-d $\Phi_{t\to s} = F_s^{-1} \circ F_t$, so the ratio is carried
  along quantile levels, interpolated in the logit of closed-form CDFs;
* re-noising over a gap g: $q'(x) = \int N(x; \alpha_g y, \sigma_g^2)\, q(y)\,dy$ by trapezoidal
  quadrature, each kernel column renormalised to unit mass on the grid.

The grid is a uniform grid on [-L, L] merged with the images under $\Phi_{10\to\delta}$ of 2000
normal quantiles, which concentrates points where $p_\delta$ has its mass (around Diracs at
small delta). KL is $\int p_\delta\,(r \log r - r + 1)$ by the trapezoidal rule: equal to
$\int q \log(q/p)$ when both integrate to 1, with a non-negative integrand of size
$(r-1)^2/2$, so quadrature errors in the masses do not swamp small KL values.

Accuracy: on 1-d Gaussian data, where the exact law is known, the grid KL agrees with the exact
one to about 1e-9 absolute or 1e-6 relative (n_grid = 4001: 5e-10 at KL = 2.1e-3, 2.5e-9 at
KL = 5.9e-3; tests: relative 1e-3 at KL ~ 1e-6). Values below about 1e-9 are at this
quadrature floor, which grows slowly with the number of steps.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp
from jaxtyping import Array
from scipy import special, stats

from ._checks import check_size, integer, prng_key, real_array
from .data import ClosedFormCDF, DataDistribution, ProductData, UniformBox
from .flow import AbstractFlowMap, ExactFlow, pf_flow
from .paths import AbstractPath, as_path
from .sampling import check_range
from .schedules import Schedule, as_schedule

__all__ = [
    "GridLaw",
    "grid_law_1d",
    "grid_points",
    "law_grid",
    "grid_kl_cdf",
    "log_cdfs_1d",
    "has_closed_form_cdf",
    "product_kl",
    "box_factors",
    "coordinate_maps",
]


class GridLaw(NamedTuple):
    """The 1-d sampler law on a grid: points `x`, sampler density `q`, target density `p`
    ($p_\\delta$), `kl` = KL(q || p), `mass` (integral of q, 1 up to quadrature error) and
    `transport`, how each step pushed the density: ``"exact"`` (exact flow), ``"monotone"``
    (change of variables through f) or ``"mass"`` (mass transport, f not monotone on the grid)."""

    x: np.ndarray
    q: np.ndarray
    p: np.ndarray
    kl: float
    mass: float
    transport: tuple = ()


def box_factors(box: UniformBox) -> list[UniformBox]:
    """The 1-d factors of a box, `box.factors()`: `UniformBox([low_i], [high_i])` for each
    coordinate; equal coordinates share one factor object, so `product_kl` computes their grid
    law once."""
    if not isinstance(box, ProductData):
        raise TypeError(f"`box` must be a product of 1-d factors, got {type(box).__name__}")
    return box.factors()


def _trapezoid_weights(x: np.ndarray) -> np.ndarray:
    w = np.zeros_like(x)
    dx = np.diff(x)
    w[:-1] += dx / 2
    w[1:] += dx / 2
    return w


N_FOCUS = 2000  # focused points of the default grid


def check_grid_size(n_grid: int, kernels: int = 1) -> None:
    """The resource guard of the grid laws: `kernels` transition kernels (and one working
    copy) of (n_grid + N_FOCUS)^2 float64 values."""
    size = n_grid + N_FOCUS
    check_size("n_grid", 8 * size**2 * (kernels + 1), f"{kernels} kernel(s) of {size}^2 values")


def grid_points(
    data: DataDistribution,
    delta: float,
    n_grid: int = 4001,
    half_width: float | None = None,
    n_focus: int = N_FOCUS,
) -> np.ndarray:
    """The grid of the 1-d grid laws: `n_grid` uniform points on [-half_width, half_width]
    (default: 8 plus the data's extent) merged with the images under Phi_{10 -> delta} of
    `n_focus` normal quantiles (points where p_delta has its mass)."""
    if half_width is None:
        extent = np.abs(np.asarray(data.sample(jax.random.key(0), 4096))).max()
        half_width = 8.0 + float(extent)
    u = (np.arange(n_focus) + 0.5) / n_focus
    quantiles = stats.norm.ppf(u)[:, None]
    focused = np.asarray(pf_flow(data, jnp.asarray(quantiles), 10.0, delta))[:, 0]
    x = np.concatenate([np.linspace(-half_width, half_width, n_grid), focused])
    return np.unique(np.round(x, 12))


def law_grid(
    data: DataDistribution,
    schedule: Schedule,
    n_grid: int = 4001,
    half_width: float | None = None,
    path: AbstractPath | None = None,
) -> np.ndarray:
    """The points `grid_law_1d` propagates the laws of `schedule` on (`grid_points` at the OU
    time of its last time on `path`, default OU). Pass them as `grid=` to the laws of many
    models, or of schedules that end at the same time: the ODE solve that places them then
    runs once, and every law is that of the call without `grid`."""
    _, s, *_ = _ou_schedule(as_path(path), schedule)
    return grid_points(data, s[-1], n_grid, half_width)


def _log_density(data: DataDistribution, x: np.ndarray, t: float) -> np.ndarray:
    """log p_t(x) on OU at the 1-d points x (n,); t > 0 (schedules land at delta > 0)."""
    return np.asarray(_log_marginal(data, jnp.asarray(x)[:, None], jnp.asarray(t)), np.float64)


@eqx.filter_jit
def _log_marginal(data: DataDistribution, x: Array, t: Array) -> Array:
    """One compiled program per data structure and number of points (eagerly, NumPyro's
    log-density compiles some thirty operations one by one for each new shape)."""
    return data.marginal_law(t).log_prob(x)


def _exact_step(data, x, q, log_p_t, log_p_s, t, s):
    """Exact flow t -> s: the ratio q/p is transported unchanged, r_s(y) = r_t(Phi_{s->t}(y)).
    (The CDF route of `grid_kl_cdf` avoids the ODE solve but is about 2.5 times less accurate
    here: 7e-9 against 2.5e-9 absolute at KL = 5.9e-3, n_grid = 4001.)"""
    back = np.asarray(pf_flow(data, jnp.asarray(x)[:, None], s, t))[:, 0]
    return np.interp(back, x, q / np.exp(log_p_t)) * np.exp(log_p_s), "exact"


def _push_step(f, x, w, q, log_p_s_of):
    r"""Push the density q through y = f(x) (f: `_OUMap`, the step's map in OU coordinates);
    returns q_s on the grid.

    Monotone f (strictly increasing on the grid, f' > 0): change of variables
    $q_s(f(x)) = q_t(x)/f'(x)$, written for the ratio $g = q_s/p_s$ at the image points and
    interpolated onto the grid (g is smooth and near 1 when f is near the exact flow, so linear
    interpolation is accurate); f' by reverse-mode autodiff. Otherwise: mass transport, each
    grid cell's mass w_i q_i moved to f(x_i) and split linearly between its two neighbours."""
    y, dy = f.image_and_slope(x)
    if not (np.all(np.isfinite(y)) and np.all(np.isfinite(dy))):
        raise FloatingPointError(f"f(x, {f.t:g}, {f.s:g}) is not finite on the grid")
    if np.all(np.diff(y) >= 0) and np.all(dy > 0):
        with np.errstate(divide="ignore"):
            log_g = np.log(q) - np.log(dy) - log_p_s_of(y)
        keep = np.append(True, np.diff(y) > 0)  # images equal in f's precision (float32 nets)
        return np.interp(x, y[keep], np.exp(log_g[keep])) * np.exp(log_p_s_of(x)), "monotone"
    mass = w * q
    j = np.clip(np.searchsorted(x, y) - 1, 0, x.size - 2)
    frac = np.clip((y - x[j]) / (x[j + 1] - x[j]), 0.0, 1.0)
    moved = np.bincount(j, mass * (1 - frac), x.size) + np.bincount(j + 1, mass * frac, x.size)
    return moved / w, "mass"


def _kl_integrand(q: np.ndarray, log_p: np.ndarray) -> np.ndarray:
    """q log(q/p) - q + p, written as p (r log r - r + 1) with r = q/p (non-negative, of size
    p (r-1)^2/2) where p is representable, and from the logs where it underflows."""
    p = np.exp(log_p)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = q / p
        direct = p * (special.xlogy(r, r) - r + 1)
        logs = special.xlogy(q, q) - q * log_p - q + p
    return np.where(np.isfinite(direct), direct, logs)


def grid_law_1d(
    data: DataDistribution,
    *,
    delta: float | None = None,
    h: float | None = None,
    steps: int | None = None,
    tau: float = 0.0,
    schedule: Schedule | None = None,
    f=None,
    n_grid: int = 4001,
    half_width: float | None = None,
    grid: np.ndarray | None = None,
    path: AbstractPath | None = None,
    extrapolate: bool = False,
) -> GridLaw:
    r"""Law of `mcm_prob.sample` for a 1-d family, on a grid (see module doc).

    **Arguments:** `data` with `dim == 1`; the sampler's schedule (constant step `delta`, `h`,
    `steps`, `tau`, or any `schedule`); `f`: the consistency function f(x, t, s) on x of shape
    (n, 1), e.g. a fitted net (default: the exact flow); `n_grid` uniform points on
    [-half_width, half_width] (default: 8 plus the data's extent). `grid`: the points of
    `grid_points(data, delta, n_grid, half_width)` computed once (off OU: at `path.ou_time(delta)`), when many laws of the same
    data and delta are wanted (it replaces `n_grid` and `half_width`). `path`: the Gaussian
    path of the schedule and of f (default: f's own path, else OU); `extrapolate`: as in
    `mcm_prob.sample`, a model `f` is refused outside the time range it was trained on. The
    grid must hold the mass of the start law and of p_delta (to 1e-6): a grid that misses
    some is refused by name instead of returning the KL of the part it covers. Off OU the law is
    propagated in OU coordinates ($x = c_t X^{OU}_{u_t}$, docs/conventions.md), where the
    prior and p_delta share one grid; then `x`, `q`, `p` of the result are in those coordinates
    at OU time $u_\delta$ (the path's are $c_\delta x$ and $q / c_\delta$) and `kl` is the
    path's (KL is invariant under the rescaling).
    """
    if data.dim != 1:
        raise ValueError(f"`data` must be a 1-d family (dim == 1), got dim = {data.dim}")
    integer("n_grid", n_grid, ge=101)
    if f is not None and not callable(f):
        raise TypeError(f"`f` must be a callable f(x, t, s), got {type(f).__name__}")
    sched = as_schedule(schedule, delta=delta, h=h, steps=steps, tau=tau)
    if f is not None:
        check_range(f, sched, extrapolate)
    path = as_path(path, f)
    path.check_time("schedule.t[0]", sched.horizon)
    # in OU coordinates: x_path = c X^OU at OU time u (KL is invariant under the rescaling)
    t, s, c_t, c_s, start_std = _ou_schedule(path, sched)
    gap = t[1:] - s[:-1]
    kernels_kept = max(1, len(set(gap[gap > 0].tolist())))
    check_grid_size(n_grid if grid is None else np.size(grid) - N_FOCUS, kernels_kept)
    if grid is None:
        x = grid_points(data, s[-1], n_grid, half_width)
    else:
        x = real_array("grid", grid, ndim=1)
        if x.size < 101 or not np.all(np.diff(x) > 0):
            raise ValueError("`grid` must be at least 101 strictly increasing points")
    w = _trapezoid_weights(x)
    q = stats.norm.pdf(x, scale=start_std)
    _check_coverage(
        "grid" if grid is not None else "half_width",
        x,
        outside_start=float(
            stats.norm.cdf(x[0], scale=start_std) + stats.norm.sf(x[-1], scale=start_std)
        ),
        mass_delta=float(w @ np.exp(_log_density(data, x, s[-1]))),
    )
    transport, kernels = [], {}
    for k in range(sched.steps):
        log_p = _log_density(data, x, s[k])
        if f is None:
            q, how = _exact_step(data, x, q, _log_density(data, x, t[k]), log_p, t[k], s[k])
        else:
            log_p_s_of = lambda z, tk=s[k]: _log_density(data, z, tk)  # noqa: E731
            f_k = _OUMap(f, c_t[k], c_s[k], sched.t[k], sched.s[k])
            q, how = _push_step(f_k, x, w, q, log_p_s_of)
        transport.append(how)
        if k < sched.steps - 1 and gap[k] > 0:
            if gap[k] not in kernels:  # OU transition density, columns normalised on the grid
                a, sd = math.exp(-gap[k]), math.sqrt(-math.expm1(-2 * gap[k]))
                kernel = np.subtract.outer(x / sd, (a / sd) * x)  # in place: N^2 floats
                np.square(kernel, out=kernel)
                kernel *= -0.5
                np.exp(kernel, out=kernel)
                kernel /= w @ kernel
                kernels[gap[k]] = kernel
            q = kernels[gap[k]] @ (w * q)
    mass = float(np.sum(w * q))
    kl = float(np.sum(w * _kl_integrand(q, log_p)))
    if not (math.isfinite(kl) and math.isfinite(mass)):
        raise FloatingPointError("grid propagation produced non-finite values; refine the grid")
    return GridLaw(x, q, np.exp(log_p), kl, mass, tuple(transport))


def _check_coverage(name: str, x: np.ndarray, outside_start: float, mass_delta: float) -> None:
    """Refuse a grid that misses mass: more than 1e-6 of the start law (exact normal tails) or
    a trapezoid mass of p_delta off 1 by more than 1e-3 (the default grid's quadrature error is
    about 1e-5); the grid law would be the KL of the part the grid covers."""
    for law, missing, tol in (
        ("the start law", outside_start, 1e-6),
        ("p_delta", 1 - mass_delta, 1e-3),
    ):
        if not abs(missing) <= tol:
            raise ValueError(
                f"the grid [{x[0]:g}, {x[-1]:g}] of {x.size} points misses mass {missing:.3g} of "
                f"{law} (more than {tol:g}): widen or refine it (`{name}`; the default grid "
                "covers the data's extent plus 8)"
            )


def _ou_schedule(path: AbstractPath, sched: Schedule):
    """OU times of the schedule (inf, where a = 0, capped at 50: p is N(0, I) there to working
    precision), the scales c_t, c_s, and the start's standard deviation in OU coordinates."""

    def ou(v):
        u = np.asarray(path.ou_time(jnp.asarray(v)), np.float64)
        return np.where(np.isinf(u), 50.0, u)

    c_t = np.asarray(path.scale(jnp.asarray(sched.t)), np.float64)
    c_s = np.asarray(path.scale(jnp.asarray(sched.s)), np.float64)
    start = float(path.prior_std(sched.horizon)) / float(c_t[0])
    return ou(sched.t), ou(sched.s), c_t, c_s, start


class _OUMap(NamedTuple):
    r"""A map f(x, t, s) of a path at one step (t, s in the path's time), as a map of OU
    coordinates on the 1-d grid: $z \mapsto f(c_t z, t, s) / c_s$ ($c = 1$ on OU)."""

    f: object
    c_t: float
    c_s: float
    t: float
    s: float

    def image_and_slope(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The images y and the slopes dy/dx at the grid points x (n,), both (n,) float64.
        A model (`AbstractFlowMap`; not the exact flow, which validates its arguments) is
        evaluated through its jit-traceable `single` as one compiled program per model
        structure and grid size; any other f eagerly, batched, its slope by `jax.grad`."""
        args = (self.t, self.s, self.c_t, self.c_s)
        if isinstance(self.f, AbstractFlowMap) and not isinstance(self.f, ExactFlow):
            y, dy = _image_and_slope(self.f, jnp.asarray(x), *map(jnp.asarray, args))
            return np.asarray(y, np.float64), np.asarray(dy, np.float64)
        xs = jnp.asarray(x)[:, None]

        def g(z):
            return self.f(self.c_t * z, self.t, self.s) / self.c_s

        y = np.asarray(g(xs), np.float64)
        if y.shape != xs.shape:
            raise ValueError(
                f"`f` must return shape (n, 1) for 1-d data, got {y.shape} for {xs.shape}"
            )
        dy = np.asarray(jax.grad(lambda z: jnp.sum(g(z)))(xs), np.float64)
        return y[:, 0], dy[:, 0]


@eqx.filter_jit
def _image_and_slope(f: AbstractFlowMap, x: Array, t, s, c_t, c_s) -> tuple[Array, Array]:
    """y = f(c_t x, t, s) / c_s and dy/dx at the points x (n,) of 1-d data."""

    def image(z):
        y = f.single(c_t * z[None], t, s)
        if y.shape != (1,):
            raise ValueError(f"`f` must map 1-d points to shape (1,), got {y.shape}")
        return y[0] / c_s

    return jax.vmap(jax.value_and_grad(image))(x)


def coordinate_maps(f, dim: int, schedule: Schedule, *, key=None, rtol: float = 1e-6) -> list:
    """The 1-d maps f_i(x, t, s) of a coordinate-wise consistency function f on R^dim
    (coordinate i of f depends on x_i only), checked by its Jacobian at a few points."""
    dim = integer("dim", dim)
    key = jax.random.key(0) if key is None else prng_key("key", key)
    pts = jax.random.normal(key, (4, dim), jnp.result_type(float))
    t, s = float(schedule.t[0]), float(schedule.s[0])
    jac = np.asarray(jax.vmap(jax.jacrev(lambda z: f(z[None], t, s)[0]))(pts))
    off = jac * (1 - np.eye(dim))
    if np.max(np.abs(off)) > rtol * max(np.max(np.abs(jac)), 1e-300):
        raise ValueError(
            "`f` is not coordinate-wise (its Jacobian has off-diagonal entries), so the "
            "sampler law is not a product of 1-d laws; the grid law applies to 1-d data only"
        )

    def coordinate(i):
        def f_i(x, t, s):
            z = jnp.zeros((x.shape[0], dim), x.dtype).at[:, i].set(x[:, 0])
            return f(z, t, s)[:, i : i + 1]

        for name in ("trained_range", "path"):  # f's range is checked, its path kept
            if hasattr(f, name):
                setattr(f_i, name, getattr(f, name))
        return f_i

    return [coordinate(i) for i in range(dim)]


def product_kl(factors, *, f=None, **law_kwargs) -> float:
    """KL(sampler law || p_delta) for a product target with the given 1-d `factors`: the sum
    of the 1-d grid KLs. `f`: None (exact flow; identical factor objects computed once) or a
    list of 1-d maps, one per factor (see `coordinate_maps`). Other keyword arguments (the
    schedule, grid settings) as `grid_law_1d`."""
    factors = list(factors)
    if not factors:
        raise ValueError("`factors` must contain at least one 1-d family")
    if f is not None and len(f) != len(factors):
        raise ValueError(f"`f` must hold one map per factor ({len(factors)}), got {len(f)}")
    cache: dict[int, float] = {}
    total = 0.0
    for i, fac in enumerate(factors):
        if f is not None:
            total += grid_law_1d(fac, f=f[i], **law_kwargs).kl
            continue
        if id(fac) not in cache:
            cache[id(fac)] = grid_law_1d(fac, **law_kwargs).kl
        total += cache[id(fac)]
    return total


# -- exact-flow grid laws without ODE solves (1-d families with closed-form CDFs) ----------------
def has_closed_form_cdf(data: DataDistribution) -> bool:
    """Whether `data` is a 1-d family with a closed-form CDF (`mcm_prob.data.ClosedFormCDF`)."""
    return isinstance(data, ClosedFormCDF) and data.dim == 1


def log_cdfs_1d(data: DataDistribution, x: Array, t) -> tuple[Array, Array]:
    r"""$(\log F_t(x), \log(1 - F_t(x)))$ for the 1-d OU marginal $p_t$ (x of shape (n,)), from
    the family's closed form (`ClosedFormCDF.noised_log_cdfs` at $a = e^{-t}$,
    $b = \sqrt{1 - e^{-2t}}$); differentiable in x and t (JAX)."""
    if not has_closed_form_cdf(data):
        raise ValueError(f"no closed-form CDF for {type(data).__name__} with dim {data.dim}")
    return data.noised_log_cdfs(x, jnp.exp(-t), jnp.sqrt(-jnp.expm1(-2 * t)))


def grid_kl_cdf(data: DataDistribution, x: Array, t: Array, s: Array) -> Array:
    r"""KL(sampler law || p_delta) for the exact flow on a 1-d family with a closed-form CDF,
    on the grid x (sorted, shape (n,)), start and landing times t, s of shape (K,); a JAX function
    of the times (jit- and grad-compatible).

    In 1-d the exact flow $\Phi_{t\to s} = F_s^{-1}\circ F_t$ keeps the density ratio $r = q/p$
    constant along quantile levels, so $r_s(y) = r_t(x)$ where $F_s(y) = F_t(x)$: the flow is an
    interpolation in the logit of the CDF, no ODE solve. Re-noising as in `grid_law_1d`, with
    kernel columns normalised in log space (well defined for vanishing gaps)."""
    dx = jnp.diff(x)
    w = jnp.zeros_like(x).at[:-1].add(dx / 2).at[1:].add(dx / 2)
    q = jnp.exp(-0.5 * x**2 - 0.5 * math.log(2 * math.pi))
    steps = t.shape[0]
    for k in range(steps):
        lp_t = data.marginal_law(t[k]).log_prob(x[:, None])
        lp_s = data.marginal_law(s[k]).log_prob(x[:, None])
        logit_t, logit_s = (jnp.subtract(*log_cdfs_1d(data, x, tk)) for tk in (t[k], s[k]))
        ratio = jnp.interp(logit_s, logit_t, q * jnp.exp(-lp_t))
        q = ratio * jnp.exp(lp_s)
        if k < steps - 1:
            gap = t[k + 1] - s[k]
            a, var = jnp.exp(-gap), jnp.maximum(-jnp.expm1(-2 * gap), 1e-30)
            log_kernel = -0.5 * (x[:, None] - a * x[None, :]) ** 2 / var
            log_kernel = log_kernel - logsumexp(log_kernel + jnp.log(w)[:, None], axis=0)
            q = jnp.exp(log_kernel) @ (w * q)
    ratio = q * jnp.exp(-lp_s)
    safe = jnp.where(ratio > 0, ratio, 1.0)
    integrand = jnp.exp(lp_s) * jnp.where(ratio > 0, safe * jnp.log(safe) - safe + 1, 1.0)
    return jnp.sum(w * integrand)
