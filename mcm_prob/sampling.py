r"""Multi-step consistency sampling (docs/conventions.md) and its exact law for Gaussian data.

With step h, K = `steps`, re-noising length $\tau$ and stop time $\delta$: $t_k = \delta + (K-k)h$
for k = 0..K; x from the path's prior at $t_0$ (OU: N(0, I)); for k = 0..K-1,
$s_k = \max(t_{k+1} - \tau, \delta)$, $y = f(x, t_k, s_k)$ and, if k < K-1,
$x = r_k y + \mathrm{std}_k\,\xi$, the path's transition from $s_k$ to $t_{k+1}$ (OU:
$r = \alpha_{t_{k+1}-s_k}$, $\mathrm{std} = \sigma_{t_{k+1}-s_k}$). The output is the last y, a
draw meant to follow $p_\delta$. $\tau = 0$ composes flow maps deterministically; $\tau = \infty$ is Song et al.'s
multistep Algorithm 1; intermediate $\tau$ is CTM's gamma-sampling in OU time. Any other start
and landing times are passed as a `mcm_prob.Schedule` (`schedule=`), of which this constant step
is one constructor.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jaxtyping import Array

from ._checks import check_size, finite_or_raise, integer, number, prng_key, real_array
from .data import Gaussian
from .devices import rows_over_processes
from .laws import EigenNormal, eigen_law_moments, gaussian_law_moments, gaussian_parts
from .paths import OU, AbstractPath, as_path
from .schedules import Schedule, as_schedule

__all__ = [
    "SamplerOutput",
    "sample",
    "sample_grid",
    "sample_deterministic",
    "sample_song",
    "sample_gamma",
    "sampler_times",
    "sampler_law",
    "affine_error",
]


class SamplerOutput(NamedTuple):
    """Samples of shape (n, dim) and the number of function (network) evaluations used."""

    samples: Array
    nfe: int


def sampler_times(*, delta: float, h: float, steps: int, tau: float = 0.0):
    """The constant-step schedule as numpy float64 arrays: t_k (K + 1,) with t_K = delta,
    s_k (K,), and re-noise lengths t_{k+1} - s_k (K - 1,). See `Schedule` for any times."""
    sched = Schedule.constant(delta=delta, h=h, steps=steps, tau=tau)
    return np.append(sched.t, sched.delta), sched.s, sched.gaps


def sample(
    f,
    key: Array,
    n: int,
    *,
    dim: int,
    delta: float | None = None,
    h: float | None = None,
    steps: int | None = None,
    tau: float = 0.0,
    schedule: Schedule | None = None,
    extrapolate: bool = False,
    path: AbstractPath | None = None,
    init=None,
) -> SamplerOutput:
    """Run the multi-step consistency sampler with any consistency function f(x, t, s).

    **Arguments:** `f` maps x of shape (n, dim) and scalar times to shape (n, dim); `key` (typed
    JAX key); `n` samples; `dim`; then either the constant step (`delta` > 0 stop time, `h` > 0
    step, `steps` = K >= 1, `tau` >= 0 re-noising length, `math.inf` for Algorithm 1) or
    `schedule`, any `mcm_prob.Schedule`; `path` (times in its units; re-noising by its
    transitions; default: the path `f` was trained on, ``f.path``, else OU); `init`: the law
    of the start x at t_0 (a NumPyro distribution with event shape (dim,), e.g. the exact
    `data.marginal(t_0, path)`; default the path's prior). When
    `f` knows the time range it was trained on (``f.trained_range`` = (delta, T), e.g. a model
    from `mcm_prob.load_model`), a schedule that starts above T or lands below delta is
    refused; `extrapolate=True` runs it anyway with a warning.

    **Returns:** `SamplerOutput(samples (n, dim), nfe=K)`. The loop is a `lax.scan`, so the
    whole sampler can be jit-compiled (pass f as a pytree, e.g. an `eqx.Module`).
    """
    n, dim, key = integer("n", n), integer("dim", dim), prng_key("key", key)
    check_size("n", 4 * 8 * n * dim, f"{n} samples in dimension {dim}")  # x, y, noise, f's
    path = as_path(path, f)
    sched = as_schedule(schedule, delta=delta, h=h, steps=steps, tau=tau)
    check_range(f, sched, extrapolate)
    k_init, k_run = jax.random.split(key)
    x0 = _initial(path, sched, init, k_init, n, dim)
    y = _run_sampler(f, k_run, x0, *_times(path, sched))
    y = finite_or_raise(y, "the sampler produced non-finite values; check f and the schedule")
    return SamplerOutput(y, sched.steps)


def _initial(path: AbstractPath, sched: Schedule, init, key, n: int, dim: int) -> Array:
    """n start points at t_0: the path's prior, or draws of `init`."""
    path.check_time("schedule.t[0]", sched.horizon)
    dtype = jnp.result_type(float)
    if init is None:
        return jnp.asarray(path.prior_std(sched.horizon), dtype) * jax.random.normal(
            key, (n, dim), dtype
        )
    if not isinstance(init, dist.Distribution) or init.event_shape != (dim,):
        raise ValueError(
            f"`init` must be a NumPyro distribution with event shape ({dim},), got {init!r}"
        )
    return jnp.asarray(init.sample(key, (n,)), dtype)


def _times(path: AbstractPath, sched: Schedule):
    """(t, s, re-noise ratio, re-noise std), each (K,): the transition from s_k to t_{k+1}
    (ratio 1, std 0 after the last step)."""
    dtype = jnp.result_type(float)
    ratio, std = path.transition_coefficients(jnp.asarray(sched.s[:-1]), jnp.asarray(sched.t[1:]))
    ratio = jnp.append(jnp.asarray(ratio, dtype), 1.0)
    std = jnp.append(jnp.asarray(std, dtype), 0.0)
    return jnp.asarray(sched.t, dtype), jnp.asarray(sched.s, dtype), ratio, std


def check_range(f, sched: Schedule, extrapolate: bool) -> None:
    """Refuse (or, with `extrapolate`, warn about) a schedule outside f's trained range."""
    if not isinstance(extrapolate, bool):
        raise ValueError(f"`extrapolate` must be True or False, got {extrapolate!r}")
    trained = getattr(f, "trained_range", None)
    if trained is None:
        return
    low, high = trained
    start, land = float(sched.horizon), float(sched.delta)
    if start <= high * (1 + 1e-9) and land >= low * (1 - 1e-9):
        return
    message = (
        f"the schedule runs the model on [{land:g}, {start:g}], outside the time range it was "
        f"trained on [{low:g}, {high:g}]"
    )
    if not extrapolate:
        raise ValueError(
            f"{message}; choose `delta`, `h` and `steps` (or `schedule`) inside it, or pass "
            "`extrapolate=True` to sample anyway"
        )
    warnings.warn(f"{message}: its outputs there are extrapolations", stacklevel=3)


@eqx.filter_jit
def _run_sampler(f, key, x, t, s, ratio, std):
    """The sampler loop from the start points x as one compiled program (times are traced: no
    recompilation when only delta, h or tau change; f is a pytree argument or, for plain
    callables, static)."""
    dtype = x.dtype

    def body(carry, inputs):
        x, _ = carry
        k, t_k, s_k, r_k, sd_k = inputs
        y = jnp.asarray(f(x, t_k, s_k), dtype)
        xi = jax.random.normal(jax.random.fold_in(key, k), x.shape, dtype)
        return (r_k * y + sd_k * xi, y), None

    (_, y), _ = jax.lax.scan(body, (x, x), (jnp.arange(t.shape[0]), t, s, ratio, std))
    return y


def sample_grid(
    grid, keys: Array, n: int, *, dim: int, schedule: Schedule, skip=None, path=None
) -> Array:
    """`sample` for every model of a `mcm_prob.FittedGrid` as one compiled program.

    Model (i, j) draws with ``keys[j]`` (one key per seed column: the models of one seed
    share their noise, common random numbers across Delta), so ``out[i, j]`` equals
    ``sample(grid[i, j], keys[j], n, dim=dim, schedule=schedule, path=path).samples`` up to
    float round-off. `skip`: optional boolean (n_rows, n_cols) mask of models to leave out
    (e.g. diverged fits); their draws are NaN. **Returns:** shape (n_rows, n_cols, n, dim);
    non-finite draws of any other model raise.
    """
    n, dim, keys = integer("n", n), integer("dim", dim), prng_key("keys", keys, stacked=True)
    path = as_path(path, grid.models)
    sched = as_schedule(schedule)
    rows, cols = grid.shape
    if keys.shape[0] != cols:
        raise ValueError(f"`keys` must hold one key per grid column ({cols}), got {keys.shape}")
    skip = np.zeros((rows, cols), bool) if skip is None else np.asarray(skip, bool)
    if skip.shape != (rows, cols):
        raise ValueError(f"`skip` must have the grid's shape {(rows, cols)}, got {skip.shape}")
    split = jax.vmap(jax.random.split)(keys)
    x0 = jax.vmap(lambda k: _initial(path, sched, None, k, n, dim))(split[:, 0])
    times = _times(path, sched)
    if jax.process_count() == 1:
        y = _run_sampler_grid(grid.models, split[:, 1], x0, *times)
    else:  # the grid's rows spread over the processes (docs/scaling.md); the same draws
        y = jnp.asarray(
            rows_over_processes(
                lambda i: _run_sampler_grid(_rows(grid.models, i), split[:, 1], x0, *times), rows
            )
        )
    mask = jnp.asarray(skip)[:, :, None, None]
    if not bool(jnp.all(jnp.isfinite(y) | mask)):
        raise FloatingPointError("the sampler produced non-finite values; check the models")
    return jnp.where(mask, jnp.nan, y)


def _rows(models, i):
    """The models of grid rows `i` (index array)."""
    return jax.tree_util.tree_map(lambda a: a[i] if eqx.is_array(a) else a, models)


@eqx.filter_jit
def _run_sampler_grid(models, keys, x0, t, s, ratio, std):
    params, static = eqx.partition(models, eqx.is_array)

    def one(p, key, x):
        return _run_sampler(eqx.combine(p, static), key, x, t, s, ratio, std)

    return jax.vmap(jax.vmap(one), in_axes=(0, None, None))(params, keys, x0)


def sample_deterministic(f, key, n, *, dim, delta, h, steps) -> SamplerOutput:
    """tau = 0: composition of flow maps from t_0 down to delta (one noise draw at the start)."""
    return sample(f, key, n, dim=dim, delta=delta, h=h, steps=steps, tau=0.0)


def sample_song(f, key, n, *, dim, delta, h, steps) -> SamplerOutput:
    """tau = inf: Song et al.'s multistep Algorithm 1 (jump to delta, re-noise to t_{k+1})."""
    return sample(f, key, n, dim=dim, delta=delta, h=h, steps=steps, tau=math.inf)


def sample_gamma(f, key, n, *, dim, delta, h, steps, gamma: float) -> SamplerOutput:
    r"""CTM's gamma-sampling in OU time: jump to $s_k = t_{k+1} - \gamma h$, re-noise back.

    gamma in [0, 1] maps to tau = gamma h (gamma = 0 deterministic; gamma = 1 jumps one step
    further than the next time; larger jumps use `sample_song`)."""
    gamma = number("gamma", gamma, ge=0, le=1)
    return sample(f, key, n, dim=dim, delta=delta, h=h, steps=steps, tau=gamma * h)


def check_perturbation(perturbation, d: int):
    """The affine consistency error (A (d, d), b (d,)) of `sampler_law`, checked; zeros for None."""
    if perturbation is None:
        return np.zeros((d, d)), np.zeros(d)
    a, b = perturbation
    a = real_array("perturbation[0] (A)", a, ndim=2)
    b = real_array("perturbation[1] (b)", b, ndim=1)
    if a.shape != (d, d) or b.shape != (d,):
        raise ValueError(
            f"`perturbation` must be (A, b) with shapes ({d}, {d}), ({d},), got {a.shape}, {b.shape}"
        )
    return a, b


def _initial_moments(data: Gaussian, path: AbstractPath, t0: float, start: str, m, lam):
    """Mean and variance (per eigen-direction) of the start at t_0."""
    if start == "prior":
        return np.zeros_like(m), np.full_like(lam, float(path.prior_std(t0)) ** 2)
    if start != "exact":
        raise ValueError(f"`start` must be 'prior' or 'exact' (p_T), got {start!r}")
    a, b = float(path.a(t0)), float(path.b(t0))
    return a * m, a**2 * lam + b**2


def sampler_law(
    data: Gaussian,
    *,
    delta: float | None = None,
    h: float | None = None,
    steps: int | None = None,
    tau: float = 0.0,
    schedule: Schedule | None = None,
    perturbation: tuple | None = None,
    path: AbstractPath = OU,
    start: str = "prior",
) -> dist.MultivariateNormal:
    r"""Exact law of `sample` driven by the exact flow map (optionally perturbed) on Gaussian data.

    With $\Phi_{t\to s}(x) = a_s m + A_{t,s}(x - a_t m)$,
    $A_{t,s} = U\operatorname{diag}(\sqrt{\nu_s/\nu_t})U^\top$, $\nu_t = a_t^2\lambda + b_t^2$
    on `path`, and the affine perturbation $\hat f = \Phi + A x + b$ (`perturbation=(A, b)`,
    constant in time), every stage is affine in a Gaussian, so the law stays Gaussian:
    $y = (A_{t,s} + A)x + c$ gives $\mu \mapsto (A_{t,s}+A)\mu + c$, $C \mapsto (A_{t,s}+A) C
    (A_{t,s}+A)^\top$, and re-noising $x = r y + \mathrm{std}\,\xi$ gives $\mu \mapsto r\mu$,
    $C \mapsto r^2 C + \mathrm{std}^2 I$. Without a perturbation everything is diagonal in U and
    runs per eigenvalue in O(K d) (`mcm_prob.laws`); with one, in d x d matrices. numpy float64
    (singular data covariances included; delta > 0 keeps the law non-degenerate). The schedule
    is the constant step (`delta`, `h`, `steps`, `tau`) or any `schedule`; `start`:
    ``"prior"`` (the path's prior at t_0, as `sample`) or ``"exact"`` ($p_{t_0}$).

    **Returns:** a `numpyro.distributions.MultivariateNormal` (an `EigenNormal` without a
    perturbation; use x64 for float64 arrays).
    """
    path = as_path(path)
    m, lam, u = gaussian_parts(data)
    sched = as_schedule(schedule, delta=delta, h=h, steps=steps, tau=tau)
    path.check_time("schedule.t[0]", sched.horizon)
    mean0, var0 = _initial_moments(data, path, sched.horizon, start, m, lam)
    if perturbation is None:
        mu, var = eigen_law_moments(m, lam, sched.t, sched.s, path, mean0, var0)
        return EigenNormal(mu, var, u)
    u = np.eye(m.size) if u is None else u
    a_pert, b_pert = check_perturbation(perturbation, m.size)
    init = (u @ mean0, (u * var0) @ u.T)
    mu, cov = gaussian_law_moments(
        np, u @ m, lam, u, sched.t, sched.s, (a_pert, b_pert), path=path, init=init
    )
    return _dense_law(mu, cov)


def _dense_law(mean: np.ndarray, cov: np.ndarray) -> dist.MultivariateNormal:
    cov = 0.5 * (np.asarray(cov) + np.asarray(cov).T)
    return dist.MultivariateNormal(
        jnp.asarray(mean), scale_tril=jnp.asarray(np.linalg.cholesky(cov))
    )


def affine_error(data: Gaussian, perturbation: tuple, t, *, path: AbstractPath = OU) -> np.ndarray:
    r"""Size of the perturbation in $L^2(p_t)$: $E_{x\sim p_t}\|Ax + b\|^2 =
    \operatorname{tr}(A\Sigma_t A^\top) + \|A m_t + b\|^2$, for each t in `t` (any shape)."""
    path = as_path(path)
    m, lam, u = gaussian_parts(data)
    u = np.eye(m.size) if u is None else u
    m = u @ m
    a_pert, b_pert = check_perturbation(perturbation, m.size)
    t = real_array("t", t)
    if np.any(t < 0):
        raise ValueError("`t` must be >= 0")
    out = np.empty(t.shape)
    for idx, tk in np.ndenumerate(t):
        a, b = float(path.a(tk)), float(path.b(tk))
        cov_t = (u * (a**2 * lam + b**2)) @ u.T
        mean_t = a_pert @ (a * m) + b_pert
        out[idx] = np.trace(a_pert @ cov_t @ a_pert.T) + mean_t @ mean_t
    return out
