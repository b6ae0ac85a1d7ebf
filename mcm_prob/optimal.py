r"""Optimal sampler schedules from the exact KL of the sampler's law (Gaussian data).

For Gaussian data the law of the multi-step sampler driven by the exact flow (optionally with an
affine consistency error, as `sampler_law`) is Gaussian with moments that are smooth functions of
the start and landing times, so $KL(\text{law} \,\|\, p_\delta)$ is differentiated by JAX and
minimised with optax (Adam on $\log KL$), from several starts at once (vmapped).

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
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ._checks import integer, number
from .data import Gaussian
from .metrics import kl_gaussian
from .sampling import _affine, _gaussian_parts, gaussian_law_moments, sampler_law
from .schedules import Schedule

__all__ = ["OptimalSchedule", "optimal_schedule", "schedule_kl_gaussian"]


class OptimalSchedule(NamedTuple):
    """`schedule` (the best found), its exact `kl`, `history` (starts, iterations): the KL of
    every iterate, `starts` (the starting schedules) and `start_kl` (their exact KL)."""

    schedule: Schedule
    kl: float
    history: np.ndarray
    starts: tuple
    start_kl: np.ndarray


def schedule_kl_gaussian(data: Gaussian, schedule: Schedule, perturbation=None) -> float:
    """Exact KL(law of the sampler on `schedule` || p_delta) for Gaussian data (float64)."""
    law = sampler_law(data, schedule=schedule, perturbation=perturbation)
    return kl_gaussian(law, data.marginal(schedule.delta))


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
    data: Gaussian,
    steps: int,
    *,
    T: float,
    delta: float,
    starts: list[Schedule] | None = None,
    n_random: int = 4,
    iterations: int = 400,
    learning_rate: float = 0.05,
    perturbation: tuple | None = None,
    key: jax.Array | None = None,
) -> OptimalSchedule:
    r"""Minimise KL(sampler law || p_delta) over K-step schedules with horizon T (module doc).

    **Arguments:** Gaussian `data`; `steps` K; horizon `T` > `delta` > 0; `starts`: schedules with
    K steps, horizon T and stop time delta (default: the constant step at horizon T with tau = 0
    and tau = inf, and the Karras spacing) plus `n_random` random ones drawn with `key`;
    `iterations` of Adam with `learning_rate` on $\log KL$; `perturbation` = (A, b), an affine
    consistency error as in `sampler_law`.

    **Returns:** `OptimalSchedule`; `schedule` is the best iterate of all runs or, if none is
    better, the best start, and `kl` its exact float64 KL (numpy, as `sampler_law`).
    """
    if not isinstance(data, Gaussian):
        raise ValueError(
            "`data` must be a mcm_prob.data.Gaussian: optimal schedules use the exact, "
            f"differentiable Gaussian sampler law; got {type(data).__name__}"
        )
    k = integer("steps", steps)
    delta = number("delta", delta, gt=0)
    T = number("T", T, gt=delta)
    integer("iterations", iterations)
    integer("n_random", n_random, ge=0)
    number("learning_rate", learning_rate, gt=0)
    m, lam, u = _gaussian_parts(data)
    a_pert, b_pert = _affine(perturbation, m.size)
    if starts is None:
        starts = [
            Schedule.fixed_horizon(T=T, delta=delta, steps=k, tau=tau) for tau in (0.0, np.inf)
        ]
        starts.append(Schedule.karras(T=T, delta=delta, steps=k))
    starts = list(starts)
    for i, st in enumerate(starts):
        if not isinstance(st, Schedule) or st.steps != k:
            raise ValueError(f"`starts[{i}]` must be a Schedule with {k} steps, got {st!r}")
        if not (np.isclose(st.horizon, T, rtol=1e-12) and np.isclose(st.delta, delta, rtol=1e-12)):
            raise ValueError(
                f"`starts[{i}]` must have horizon T = {T:g} and delta = {delta:g}, got "
                f"{st.horizon:g} and {st.delta:g}"
            )
    start_kl = np.array([schedule_kl_gaussian(data, st, perturbation) for st in starts])
    best_i = int(np.argmin(start_kl))
    if k == 1:
        return OptimalSchedule(
            starts[best_i],
            float(start_kl[best_i]),
            np.zeros((len(starts), 0)),
            tuple(starts),
            start_kl,
        )
    with jax.enable_x64(True):
        history, params = _optimise(
            m,
            lam,
            u,
            a_pert,
            b_pert,
            starts,
            n_random,
            k,
            T,
            delta,
            iterations,
            learning_rate,
            jax.random.key(0) if key is None else key,
        )
    candidates = [
        Schedule(*(np.asarray(v, np.float64) for v in _times(p, T, delta)), "optimal")
        for p in params
    ]
    found = [schedule_kl_gaussian(data, c, perturbation) for c in candidates]
    j = int(np.argmin(found))
    if found[j] < start_kl[best_i]:
        return OptimalSchedule(candidates[j], float(found[j]), history, tuple(starts), start_kl)
    return OptimalSchedule(
        starts[best_i], float(start_kl[best_i]), history, tuple(starts), start_kl
    )


def _optimise(m, lam, u, a_pert, b_pert, starts, n_random, k, T, delta, iterations, lr, key):
    """Adam on log KL from every start (vmapped); returns the KL history (starts, iterations)
    and the best parameters of each run."""
    init = [_params(st, T, delta) for st in starts]
    ka, kb = jax.random.split(key)
    a0 = np.concatenate(
        [np.stack([p[0] for p in init]), np.asarray(jax.random.normal(ka, (n_random, k)))]
    )
    b0 = np.concatenate(
        [np.stack([p[1] for p in init]), np.asarray(jax.random.normal(kb, (n_random, k - 1)))]
    )
    perturbed = bool(np.any(a_pert) or np.any(b_pert))
    args = (m, lam, u, a_pert, b_pert, T, delta, lr, a0, b0)
    hist, best_a, best_b = _adam_runs(*(jnp.asarray(v, jnp.float64) for v in args),
                                      iterations=iterations, perturbed=perturbed)  # fmt: skip
    return np.asarray(hist), list(zip(np.asarray(best_a), np.asarray(best_b), strict=True))


@functools.partial(jax.jit, static_argnames=("iterations", "perturbed"))
def _adam_runs(m, lam, u, a_pert, b_pert, T, delta, lr, a0, b0, *, iterations, perturbed):
    """One compiled program per (K, d, number of starts, iterations): every run of Adam."""
    nu = jnp.exp(-2 * delta) * lam - jnp.expm1(-2 * delta)
    prec = (u / nu) @ u.T
    m_delta, logdet_p = jnp.exp(-delta) * m, jnp.sum(jnp.log(nu))
    perturbation = (a_pert, b_pert) if perturbed else None

    def log_kl(params):
        t, s = _times(params, T, delta)
        mu, cov = gaussian_law_moments(jnp, m, lam, u, t, s, perturbation)
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

    opt = optax.adam(lr)

    def run(params):
        def step(carry, _):
            params, state, best, best_val = carry
            val, grad = jax.value_and_grad(log_kl)(params)
            better = val < best_val
            best = jax.tree.map(lambda n, o: jnp.where(better, n, o), params, best)
            updates, state = opt.update(grad, state)
            params = optax.apply_updates(params, updates)
            return (params, state, best, jnp.minimum(val, best_val)), jnp.exp(val)

        carry = (params, opt.init(params), params, jnp.asarray(jnp.inf, m.dtype))
        (_, _, best, _), hist = jax.lax.scan(step, carry, None, length=iterations)
        return hist, best

    hist, (best_a, best_b) = jax.vmap(run)((a0, b0))
    return hist, best_a, best_b
