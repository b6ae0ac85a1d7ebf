r"""Optimal sampler schedules from the exact KL of the sampler's law.

For Gaussian data the law of the multi-step sampler driven by the exact flow (optionally with an
affine consistency error, as `sampler_law`) is Gaussian with moments that are smooth functions of
the start and landing times, so $KL(\text{law} \,\|\, p_\delta)$ is differentiated by JAX and
minimised with optax (Adam on $\log KL$), from several starts at once (vmapped). For product
targets whose 1-d factors have closed-form CDFs (boxes, Dirac and normal mixtures) the objective
is the sum of the factors' grid-law KLs computed without ODE solves
(`mcm_prob.gridlaw.grid_kl_cdf`), on a coarser grid; the schedules found are then scored with the
reference grid law (`grid_law_1d`).

Parameterisation (every iterate is a valid `Schedule` with horizon $t_0 = T$ and stop time
$\delta$): $w = \operatorname{softmax}(a) \in \Delta^{K-1}$,
$t_k = \delta + (T - \delta)\sum_{j \ge k} w_j$, and $s_k = \delta + \operatorname{sigmoid}(b_k)
(t_{k+1} - \delta)$ for k < K - 1, $s_{K-1} = \delta$. The horizon is fixed because, with the
exact flow, a larger $t_0$ only lowers the start error $KL(N(0, I) \| p_{t_0})$.

What the optimum looks like with the exact flow: the flow is a bijection that preserves KL, and
each re-noising from $s_k$ to $t_{k+1}$ is an OU transition, which contracts KL (data processing)
the more the longer it runs. So the optimiser drives $s_k \to \delta$ and the start times towards
T ("restart" schedules); the optimum is approached, not attained, at the boundary. With a
consistency error (`perturbation`) the trade-off changes and the optimum can be interior.
"""

from __future__ import annotations

import functools
import warnings
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ._checks import check_size, integer, number, prng_key
from .accuracy import product_factors, schedule_kl
from .data import ClosedFormGaussian, DataDistribution, Gaussian
from .gridlaw import grid_kl_cdf, grid_points, has_closed_form_cdf
from .laws import gaussian_law_moments, gaussian_parts
from .paths import OU, AbstractPath, as_path
from .sampling import check_perturbation
from .schedules import Schedule

__all__ = ["OptimalSchedule", "optimal_schedule"]


class OptimalSchedule(NamedTuple):
    """`schedule` (the best found), its exact `kl`, `history` (starts, iterations): the KL of
    every iterate, `starts` (the starting schedules) and `start_kl` (their exact KL)."""

    schedule: Schedule
    kl: float
    history: np.ndarray
    starts: tuple
    start_kl: np.ndarray


def _times(params, T, delta):
    a, b = params
    w = jax.nn.softmax(a)
    t = delta + (T - delta) * jnp.cumsum(w[::-1])[::-1]
    s = delta + jax.nn.sigmoid(b) * (t[1:] - delta)
    return t, jnp.append(s, delta)


def _params(schedule: Schedule, T: float, delta: float):
    t = np.append(schedule.t, delta)
    a = np.log(np.maximum(-np.diff(t) / (T - delta), 1e-300))
    frac = (schedule.s[:-1] - delta) / (schedule.t[1:] - delta)
    frac = np.clip(frac, 1e-9, 1 - 1e-9)
    return a, np.log(frac) - np.log1p(-frac)


def optimal_schedule(
    data: DataDistribution,
    steps: int,
    *,
    T: float,
    delta: float,
    dim: int | None = None,
    starts: list[Schedule] | None = None,
    n_random: int = 4,
    iterations: int = 400,
    learning_rate: float = 0.05,
    perturbation: tuple | None = None,
    key: jax.Array | None = None,
    n_grid: int = 301,
    grid: dict | None = None,
    floor: float = 0.0,
    path: AbstractPath = OU,
) -> OptimalSchedule:
    r"""Minimise KL(sampler law || p_delta) over K-step schedules with horizon T (module doc).

    **Arguments:** `data`: Gaussian (exact law), or a product target: a `UniformBox`, or a 1-d
    family with `dim` i.i.d. coordinates, whose 1-d factors have closed-form CDFs (normal
    mixtures, Diracs, the box; see `grid_kl_cdf`); `steps` K; horizon `T` > `delta` > 0;
    `starts`: schedules with K steps, horizon T and stop time delta (default: the constant step
    at horizon T with tau = 0 and tau = inf, and the Karras spacing with tau = inf) plus `n_random` random ones
    drawn with `key`; `iterations` of Adam with `learning_rate` on $\log KL$; `perturbation` =
    (A, b), an affine consistency error as in `sampler_law` (Gaussian data); `n_grid`: uniform
    (and as many focused) grid points of the product targets' grid laws while optimising;
    `grid`: keyword arguments of `grid_law_1d` for the final KLs of product targets; `floor`:
    no optimisation when a start's KL is already at or below it (the accuracy floor of the KL
    computation: nothing smaller can be told apart), and then `history` has no iterations;
    `path`: the Gaussian path of the times (Gaussian data; product targets are OU only).

    **Returns:** `OptimalSchedule`; `schedule` is the best iterate of all runs or, if none is
    better, the best start, and `kl` its KL by `schedule_kl` (float64 Gaussian law, or the
    default `grid_law_1d`).
    """
    gaussian = isinstance(data, ClosedFormGaussian) and dim is None
    with jax.enable_x64(True):  # ground truth: float64 arithmetic in every mode
        return _optimal_schedule(
            _float64(data) if gaussian else data,
            steps,
            gaussian=gaussian,
            T=T,
            delta=delta,
            dim=dim,
            starts=starts,
            n_random=n_random,
            iterations=iterations,
            learning_rate=learning_rate,
            perturbation=perturbation,
            key=key,
            n_grid=n_grid,
            grid=grid,
            floor=floor,
            path=path,
        )


def _float64(data: ClosedFormGaussian) -> ClosedFormGaussian:
    """Gaussian `data` in float64 (called with x64 on): a float32-mode family's parameters as
    they are, its eigenvectors re-orthonormalised (QR), so that its exact KLs are float64
    arithmetic, not float32's round-off floor (about 1e-8 where float64 gives 1e-12)."""
    arrays = (data.mean, data.eigvals) + (() if data.eigvecs is None else (data.eigvecs,))
    if all(jnp.asarray(a).dtype == jnp.float64 for a in arrays):
        return data  # already float64: unchanged
    m, lam, u = gaussian_parts(data)
    if u is not None:
        q, r = np.linalg.qr(u)
        u = q * np.where(np.diag(r) < 0, -1.0, 1.0)
        m = u @ m
    return Gaussian(mean=m, eigvals=lam, eigvecs=u)


def _optimal_schedule(
    data, steps, *, gaussian, T, delta, dim, starts, n_random, iterations, learning_rate,
    perturbation, key, n_grid, grid, floor, path
) -> OptimalSchedule:  # fmt: skip
    path = as_path(path)
    if not gaussian and path != OU:
        raise ValueError(
            f"optimal schedules for product targets run on the OU path only, got {path.name!r}"
        )
    if not gaussian:
        factors = product_factors(data, dim)
        bad = [type(f).__name__ for f in factors if not has_closed_form_cdf(f)]
        if bad:
            raise ValueError(
                f"optimal schedules for product targets need 1-d factors with closed-form CDFs "
                f"(Gaussian, GaussianMixture, DiracMixture, UniformBox); got {bad[0]}"
            )
    k = integer("steps", steps)
    delta = number("delta", delta, gt=0)
    T = number("T", T, gt=delta)
    path.check_time("T", T)
    integer("iterations", iterations)
    integer("n_random", n_random, ge=0)
    integer("n_grid", n_grid, ge=101)
    # product targets: (2 n_grid)^2 kernels per step, kept for the gradient
    check_size("n_grid", 8 * 3 * (2 * n_grid) ** 2 * (k + 1), f"grids of {2 * n_grid} points")
    number("learning_rate", learning_rate, gt=0)
    key = jax.random.key(0) if key is None else prng_key("key", key)
    if starts is None:
        starts = [
            Schedule.fixed_horizon(T=T, delta=delta, steps=k, tau=tau) for tau in (0.0, np.inf)
        ]
        if np.isfinite(float(path.rho(T))):
            starts.append(Schedule.karras(T=T, delta=delta, steps=k, tau=np.inf, path=path))
    starts = list(starts)
    if not starts:
        raise ValueError("`starts` must hold at least one Schedule (or be None for the defaults)")
    for i, st in enumerate(starts):
        if not isinstance(st, Schedule) or st.steps != k:
            raise ValueError(f"`starts[{i}]` must be a Schedule with {k} steps, got {st!r}")
        if not (np.isclose(st.horizon, T, rtol=1e-12) and np.isclose(st.delta, delta, rtol=1e-12)):
            raise ValueError(
                f"`starts[{i}]` must have horizon T = {T:g} and delta = {delta:g}, got "
                f"{st.horizon:g} and {st.delta:g}"
            )
    grid = {} if gaussian or grid is None else dict(grid)

    def exact(sched):
        return schedule_kl(data, sched, perturbation=perturbation, dim=dim, path=path, **grid)

    start_kl = np.array([exact(st) for st in starts])
    best = (starts[int(np.argmin(start_kl))], float(start_kl.min()))
    history = np.zeros((len(starts) + n_random, 0))
    number("floor", floor, ge=0)
    if k > 1 and best[1] > floor:
        a0, b0 = _initial(starts, n_random, k, T, delta, key)
        if gaussian:
            history, params = _optimise_gaussian(
                data, perturbation, T, delta, learning_rate, a0, b0, iterations, path
            )
        else:
            history, params = _optimise_product(
                factors, T, delta, learning_rate, a0, b0, iterations, n_grid
            )
        collapsed = 0
        for p in params:
            t, s = (np.array(v, np.float64) for v in _times(p, T, delta))
            t[0] = T  # exactly the horizon (the softmax sum can be an ulp above it)
            if not (np.all(np.diff(t) < 0) and np.all(np.isfinite(s))):
                collapsed += 1  # times that coincide: the run left the valid schedules
                continue
            cand = Schedule(t, s, "optimal")
            value = exact(cand)
            if value < best[1]:
                best = (cand, value)
        if collapsed:
            message = (
                f"`learning_rate`={learning_rate:g} drove {collapsed} of {len(params)} runs to "
                "schedules whose times coincide; lower it (default 0.05)"
            )
            if collapsed == len(params):
                raise ValueError(message)
            warnings.warn(message + "; the other runs' best is returned", stacklevel=3)
    return OptimalSchedule(best[0], best[1], history, tuple(starts), start_kl)


def _initial(starts, n_random, k, T, delta, key):
    """Parameters of the starting schedules and of `n_random` random ones."""
    init = [_params(st, T, delta) for st in starts]
    ka, kb = jax.random.split(key)
    a0 = np.concatenate([np.stack([p[0] for p in init]), jax.random.normal(ka, (n_random, k))])
    b0 = np.concatenate([np.stack([p[1] for p in init]), jax.random.normal(kb, (n_random, k - 1))])
    return a0, b0


def _optimise_gaussian(data, perturbation, T, delta, lr, a0, b0, iterations, path):
    """Adam from every start (vmapped) on the exact Gaussian law; returns the KL history
    (starts, iterations) and the best parameters of each run."""
    m, lam, u = gaussian_parts(data)
    u = np.eye(m.size) if u is None else u
    m = u @ m
    a_pert, b_pert = check_perturbation(perturbation, m.size)
    args = (m, lam, u, a_pert, b_pert, T, delta, lr, a0, b0)
    hist, (best_a, best_b) = _adam_runs(
        *(jnp.asarray(v, jnp.float64) for v in args),
        iterations=iterations,
        perturbed=perturbation is not None,
        path=path,
    )
    return np.asarray(hist), list(zip(np.asarray(best_a), np.asarray(best_b), strict=True))


def _optimise_product(factors, T, delta, lr, a0, b0, iterations, n_grid):
    """Adam from every start on the sum of the factors' CDF grid laws (`grid_kl_cdf`)."""
    distinct: dict[int, list] = {}
    for f in factors:
        distinct.setdefault(id(f), [f, 0])[1] += 1
    data = tuple(f for f, _ in distinct.values())
    counts = tuple(c for _, c in distinct.values())
    grids = tuple(jnp.asarray(grid_points(f, delta, n_grid, n_focus=n_grid)) for f in data)
    times = tuple(jnp.asarray(v, jnp.float64) for v in (T, delta, lr))
    hist, (best_a, best_b) = _product_runs(
        data, grids, *times, jnp.asarray(a0), jnp.asarray(b0), counts=counts, iterations=iterations
    )
    return np.asarray(hist), list(zip(np.asarray(best_a), np.asarray(best_b), strict=True))


@eqx.filter_jit
def _product_runs(data, grids, T, delta, lr, a0, b0, *, counts, iterations):
    """One compiled program per (factors' structure, grid sizes, K, starts, iterations)."""

    def log_kl(params):
        t, s = _times(params, T, delta)
        kl = sum(c * grid_kl_cdf(f, x, t, s) for f, c, x in zip(data, counts, grids, strict=True))
        return jnp.log(jnp.maximum(kl, 1e-300))

    return jax.vmap(lambda p: _adam_scan(log_kl, p, lr, iterations))((a0, b0))


@functools.partial(jax.jit, static_argnames=("iterations", "perturbed", "path"))
def _adam_runs(m, lam, u, a_pert, b_pert, T, delta, lr, a0, b0, *, iterations, perturbed, path):
    """One compiled program per (K, d, number of starts, iterations, path): every run of Adam."""
    nu = path.a(delta) ** 2 * lam + path.b(delta) ** 2
    prec = (u / nu) @ u.T
    m_delta, logdet_p = path.a(delta) * m, jnp.sum(jnp.log(nu))
    perturbation = (a_pert, b_pert) if perturbed else None
    init = (jnp.zeros_like(m), path.prior_std(T) ** 2 * jnp.eye(m.size))

    def log_kl(params):
        t, s = _times(params, T, delta)
        mu, cov = gaussian_law_moments(jnp, m, lam, u, t, s, perturbation, path=path, init=init)
        chol = jnp.linalg.cholesky(0.5 * (cov + cov.T))
        diff = m_delta - mu
        kl = 0.5 * (
            jnp.trace(prec @ cov)
            + diff @ prec @ diff
            - m.size
            + logdet_p
            - 2 * jnp.sum(jnp.log(jnp.diag(chol)))
        )
        return jnp.log(jnp.maximum(kl, 1e-300))

    return jax.vmap(lambda p: _adam_scan(log_kl, p, lr, iterations))((a0, b0))


def _adam_scan(log_kl, params, lr, iterations: int):
    """Adam on `log_kl` from `params`; returns the KL of every iterate and the best params."""
    opt = optax.adam(lr)

    def step(carry, _):
        params, state, best, best_val = carry
        val, grad = jax.value_and_grad(log_kl)(params)
        better = val < best_val
        best = jax.tree.map(lambda n, o: jnp.where(better, n, o), params, best)
        updates, state = opt.update(grad, state)
        params = optax.apply_updates(params, updates)
        return (params, state, best, jnp.minimum(val, best_val)), jnp.exp(val)

    carry = (params, opt.init(params), params, jnp.asarray(jnp.inf, params[0].dtype))
    (_, _, best, _), hist = jax.lax.scan(step, carry, None, length=iterations)
    return hist, best
