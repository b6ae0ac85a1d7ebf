r"""Multi-step consistency sampling (docs/conventions.md) and its exact law for Gaussian data.

With step h, K = `steps`, re-noising length $\tau$ and stop time $\delta$: $t_k = \delta + (K-k)h$
for k = 0..K; $x \sim N(0, I)$ at $t_0$; for k = 0..K-1, $s_k = \max(t_{k+1} - \tau, \delta)$,
$y = f(x, t_k, s_k)$ and, if k < K-1, $x = \alpha_{t_{k+1}-s_k} y + \sigma_{t_{k+1}-s_k}\xi$
(the OU transition from $s_k$ to $t_{k+1}$). The output is the last y, a draw meant to follow
$p_\delta$. $\tau = 0$ composes flow maps deterministically; $\tau = \infty$ is Song et al.'s
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

from ._checks import finite_or_raise, integer, number, prng_key, real_array
from .data import Gaussian
from .forward import alpha, sigma
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
) -> SamplerOutput:
    """Run the multi-step consistency sampler with any consistency function f(x, t, s).

    **Arguments:** `f` maps x of shape (n, dim) and scalar times to shape (n, dim); `key` (typed
    JAX key); `n` samples; `dim`; then either the constant step (`delta` > 0 stop time, `h` > 0
    step, `steps` = K >= 1, `tau` >= 0 re-noising length, `math.inf` for Algorithm 1) or
    `schedule`, any `mcm_prob.Schedule`. When `f` knows the time range it was trained on
    (``f.trained_range`` = (delta, T), e.g. a model from `mcm_prob.load_model`), a schedule
    that starts above T or lands below delta is refused; `extrapolate=True` runs it anyway
    with a warning.

    **Returns:** `SamplerOutput(samples (n, dim), nfe=K)`. The loop is a `lax.scan`, so the
    whole sampler can be jit-compiled (pass f as a pytree, e.g. an `eqx.Module`).
    """
    n, dim, key = integer("n", n), integer("dim", dim), prng_key("key", key)
    sched = as_schedule(schedule, delta=delta, h=h, steps=steps, tau=tau)
    _check_range(f, sched, extrapolate)
    gap = np.append(sched.gaps, 0.0)  # no re-noising after the last step
    dtype = jnp.result_type(float)
    times = tuple(jnp.asarray(a, dtype) for a in (sched.t, sched.s, gap))
    y = _run_sampler(f, key, int(n), int(dim), *times)
    y = finite_or_raise(y, "the sampler produced non-finite values; check f and the schedule")
    return SamplerOutput(y, sched.steps)


def _check_range(f, sched: Schedule, extrapolate: bool) -> None:
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
def _run_sampler(f, key, n: int, dim: int, t, s, gap):
    """The sampler loop as one compiled program (times are traced: no recompilation when only
    delta, h or tau change; f is a pytree argument or, for plain callables, static)."""
    dtype = t.dtype
    k_init, k_noise = jax.random.split(key)
    x = jax.random.normal(k_init, (n, dim), dtype)

    def body(carry, inputs):
        x, _ = carry
        k, t_k, s_k, g_k = inputs
        y = jnp.asarray(f(x, t_k, s_k), dtype)
        xi = jax.random.normal(jax.random.fold_in(k_noise, k), x.shape, dtype)
        return (alpha(g_k) * y + sigma(g_k) * xi, y), None

    (_, y), _ = jax.lax.scan(body, (x, x), (jnp.arange(t.shape[0]), t, s, gap))
    return y


def sample_grid(grid, keys: Array, n: int, *, dim: int, schedule: Schedule, skip=None) -> Array:
    """`sample` for every model of a `mcm_prob.FittedGrid` as one compiled program.

    Model (i, j) draws with ``keys[j]`` (one key per seed column: the models of one seed
    share their noise, common random numbers across Delta), so ``out[i, j]`` equals
    ``sample(grid[i, j], keys[j], n, dim=dim, schedule=schedule).samples`` up to float
    round-off. `skip`: optional boolean (n_rows, n_cols) mask of models to leave out (e.g.
    diverged fits); their draws are NaN. **Returns:** shape (n_rows, n_cols, n, dim);
    non-finite draws of any other model raise.
    """
    n, dim, keys = integer("n", n), integer("dim", dim), prng_key("keys", keys, stacked=True)
    sched = as_schedule(schedule)
    rows, cols = grid.shape
    if keys.shape[0] != cols:
        raise ValueError(f"`keys` must hold one key per grid column ({cols}), got {keys.shape}")
    gap = np.append(sched.gaps, 0.0)
    dtype = jnp.result_type(float)
    times = tuple(jnp.asarray(a, dtype) for a in (sched.t, sched.s, gap))
    skip = np.zeros((rows, cols), bool) if skip is None else np.asarray(skip, bool)
    if skip.shape != (rows, cols):
        raise ValueError(f"`skip` must have the grid's shape {(rows, cols)}, got {skip.shape}")
    y = _run_sampler_grid(grid.models, keys, int(n), int(dim), *times)
    mask = jnp.asarray(skip)[:, :, None, None]
    if not bool(jnp.all(jnp.isfinite(y) | mask)):
        raise FloatingPointError("the sampler produced non-finite values; check the models")
    return jnp.where(mask, jnp.nan, y)


@eqx.filter_jit
def _run_sampler_grid(models, keys, n: int, dim: int, t, s, gap):
    params, static = eqx.partition(models, eqx.is_array)

    def one(p, key):
        return _run_sampler(eqx.combine(p, static), key, n, dim, t, s, gap)

    return jax.vmap(jax.vmap(one), in_axes=(0, None))(params, keys)


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


def _affine(perturbation, d: int):
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


def _gaussian_parts(data: Gaussian):
    if not isinstance(data, Gaussian):
        raise TypeError(f"`data` must be a mcm_prob.data.Gaussian, got {type(data).__name__}")
    return (np.asarray(v, np.float64) for v in (data.mean, data.eigvals, data.eigvecs))


def sampler_law(
    data: Gaussian,
    *,
    delta: float | None = None,
    h: float | None = None,
    steps: int | None = None,
    tau: float = 0.0,
    schedule: Schedule | None = None,
    perturbation: tuple | None = None,
) -> dist.MultivariateNormal:
    r"""Exact law of `sample` driven by the exact flow map (optionally perturbed) on Gaussian data.

    With $\Phi_{t\to s}(x) = \alpha_s m + A_{t,s}(x - \alpha_t m)$,
    $A_{t,s} = U\operatorname{diag}(\sqrt{\nu_s/\nu_t})U^\top$, and the affine perturbation
    $\hat f = \Phi + A x + b$ (`perturbation=(A, b)`, constant in time), every stage is affine in
    a Gaussian, so the law stays Gaussian: $y = (A_{t,s} + A)x + c$ gives
    $\mu \mapsto (A_{t,s}+A)\mu + c$, $C \mapsto (A_{t,s}+A) C (A_{t,s}+A)^\top$, and re-noising
    $x = a y + b\xi$ gives $\mu \mapsto a\mu$, $C \mapsto a^2 C + b^2 I$. Computed in numpy
    float64 (singular data covariances included; delta > 0 keeps the law non-degenerate).
    The schedule is the constant step (`delta`, `h`, `steps`, `tau`) or any `schedule`.

    **Returns:** a `numpyro.distributions.MultivariateNormal` (use x64 for float64 arrays).
    """
    m, lam, u = _gaussian_parts(data)
    sched = as_schedule(schedule, delta=delta, h=h, steps=steps, tau=tau)
    a_pert, b_pert = _affine(perturbation, m.size)
    mu, cov = gaussian_law_moments(np, m, lam, u, sched.t, sched.s, (a_pert, b_pert))
    return _gaussian_law(mu, cov)


def gaussian_law_moments(xp, m, lam, u, t, s, perturbation=None):
    """Mean (d,) and covariance (d, d) of the sampler law of `sampler_law` for data mean `m`,
    covariance eigenvalues `lam` and eigenvectors `u`, start and landing times `t`, `s` (K,),
    in the array namespace `xp` (numpy for float64 ground truth; jax.numpy to differentiate with
    respect to the times)."""
    d, steps = m.shape[0], t.shape[0]
    mu, cov = xp.zeros(d), xp.eye(d)
    for k in range(steps):
        nu_t = xp.exp(-2 * t[k]) * lam - xp.expm1(-2 * t[k])
        nu_s = xp.exp(-2 * s[k]) * lam - xp.expm1(-2 * s[k])
        flow = (u * xp.sqrt(nu_s / nu_t)) @ u.T
        lin, shift = flow, xp.exp(-s[k]) * m - flow @ (xp.exp(-t[k]) * m)
        if perturbation is not None:
            lin, shift = lin + perturbation[0], shift + perturbation[1]
        mu, cov = lin @ mu + shift, lin @ cov @ lin.T
        if k < steps - 1:
            gap = t[k + 1] - s[k]
            a, sd2 = xp.exp(-gap), -xp.expm1(-2 * gap)
            mu, cov = a * mu, a**2 * cov + sd2 * xp.eye(d)
    return mu, cov


def _gaussian_law(mean: np.ndarray, cov: np.ndarray) -> dist.MultivariateNormal:
    cov = 0.5 * (cov + cov.T)
    return dist.MultivariateNormal(
        jnp.asarray(mean), scale_tril=jnp.asarray(np.linalg.cholesky(cov))
    )


def affine_error(data: Gaussian, perturbation: tuple, t) -> np.ndarray:
    r"""Size of the perturbation in $L^2(p_t)$: $E_{x\sim p_t}\|Ax + b\|^2 =
    \operatorname{tr}(A\Sigma_t A^\top) + \|A m_t + b\|^2$, for each t in `t` (any shape)."""
    m, lam, u = _gaussian_parts(data)
    a_pert, b_pert = _affine(perturbation, m.size)
    t = real_array("t", t)
    if np.any(t < 0):
        raise ValueError("`t` must be >= 0")
    out = np.empty(t.shape)
    for idx, tk in np.ndenumerate(t):
        cov_t = (u * (np.exp(-2 * tk) * lam - np.expm1(-2 * tk))) @ u.T
        mean_t = a_pert @ (np.exp(-tk) * m) + b_pert
        out[idx] = np.trace(a_pert @ cov_t @ a_pert.T) + mean_t @ mean_t
    return out
