r"""Metrics: distances between Gaussian laws, and consistency error against the exact flow map.

Gaussian laws (closed forms, numpy float64): `kl_gaussian` and `w2_gaussian`.

Consistency error of any f(x, t, s):

$$\mathcal E(t, s) = E_{x\sim p_t}\,\|f(x, t, s) - \Phi_{t\to s}(x)\|^2,$$

estimated on n exact draws of $p_t$ per (t, s) pair. The draws depend only on `key` and the
pair index, so every model evaluated with the same key sees the same points (common random
numbers): differences between models (e.g. between Delta values) are not swamped by sampling
noise.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._checks import check_times
from .data import DataDistribution
from .flow import flow_map

__all__ = [
    "kl_gaussian",
    "w2_gaussian",
    "ConsistencyError",
    "consistency_error",
    "default_time_pairs",
]


def _moments(law, name: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        mean, cov = np.asarray(law.mean, np.float64), np.asarray(law.covariance_matrix, np.float64)
    except AttributeError as err:
        raise TypeError(
            f"`{name}` must be a Gaussian law with `.mean` and `.covariance_matrix` "
            f"(e.g. numpyro MultivariateNormal), got {type(law).__name__}"
        ) from err
    if mean.ndim != 1 or cov.shape != (mean.size, mean.size):
        raise ValueError(f"`{name}` must be a single (unbatched) law, got mean shape {mean.shape}")
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(cov))):
        raise ValueError(f"`{name}` has non-finite parameters")
    return mean, 0.5 * (cov + cov.T)


def kl_gaussian(p, q) -> float:
    r"""$KL(p\,\|\,q)$ for two Gaussian laws (numpyro `MultivariateNormal`), in float64.

    With $L_q$ the Cholesky factor of $\Sigma_q$ and $e_i$ the eigenvalues of
    $M = L_q^{-1}\Sigma_p L_q^{-\top}$,
    $KL = \tfrac12\big[\sum_i (e_i - 1 - \log e_i) + \|L_q^{-1}(\mu_q - \mu_p)\|^2\big]$, where
    $u - \log(1 + u)$ is evaluated on $u_i = e_i - 1$ (eigenvalues of $M - I$) so that tiny
    KL values (1e-20, say) keep their relative accuracy instead of cancelling.
    """
    mp_, cp = _moments(p, "p")
    mq, cq = _moments(q, "q")
    if mp_.size != mq.size:
        raise ValueError(f"`p` and `q` must have the same dimension, got {mp_.size} and {mq.size}")
    lq = np.linalg.cholesky(cq)
    lq_inv = np.linalg.solve(lq, np.eye(mq.size))
    u = np.linalg.eigvalsh(lq_inv @ (cp - cq) @ lq_inv.T)
    if np.any(u <= -1):
        raise ValueError("`p` must have a positive-definite covariance")
    diff = lq_inv @ (mq - mp_)
    return 0.5 * float(np.sum(u - np.log1p(u)) + diff @ diff)


def _sqrtm_psd(c: np.ndarray) -> np.ndarray:
    lam, vecs = np.linalg.eigh(c)
    return (vecs * np.sqrt(np.clip(lam, 0.0, None))) @ vecs.T


def w2_gaussian(p, q) -> float:
    r"""2-Wasserstein distance between Gaussian laws (closed form, float64):
    $W_2^2 = \|\mu_p - \mu_q\|^2 + \operatorname{tr}\big(\Sigma_p + \Sigma_q -
    2(\Sigma_q^{1/2}\Sigma_p\Sigma_q^{1/2})^{1/2}\big)$. Singular covariances are allowed."""
    mp_, cp = _moments(p, "p")
    mq, cq = _moments(q, "q")
    if mp_.size != mq.size:
        raise ValueError(f"`p` and `q` must have the same dimension, got {mp_.size} and {mq.size}")
    rq = _sqrtm_psd(cq)
    cross = _sqrtm_psd(rq @ cp @ rq)
    w2sq = float(np.sum((mp_ - mq) ** 2) + np.trace(cp + cq - 2 * cross))
    return math.sqrt(max(w2sq, 0.0))


class ConsistencyError(NamedTuple):
    """Per-pair mean squared error, its standard error, and the average over pairs.

    `per_pair` and `stderr` have shape (*model_axes, n_pairs); `mean` has shape model_axes
    (model_axes is () for a single f, (n_steps, n_seeds) for a `FittedGrid`).
    """

    t: np.ndarray
    s: np.ndarray
    per_pair: np.ndarray
    stderr: np.ndarray
    mean: np.ndarray


def default_time_pairs(delta: float, T: float) -> list[tuple[float, float]]:
    """A spread of (t, s) pairs on [delta, T]: t in {0.25, 0.5, 1, 2, 4} (<= T, > delta) with
    s = delta (the one-step map) and s = (t + delta) / 2 (an intermediate jump)."""
    ts = [t for t in (0.25, 0.5, 1.0, 2.0, 4.0) if delta < t <= T] or [T]
    return [(t, s) for t in ts for s in (delta, 0.5 * (t + delta))]


def consistency_error(
    f, data: DataDistribution, pairs, *, key: jax.Array, n: int = 2048, **flow_kwargs
) -> ConsistencyError:
    """Consistency error of `f` against the exact flow map of `data` on (t, s) `pairs`.

    **Arguments:**
    - `f`: any callable f(x, t, s) with x of shape (n, dim); its output may carry extra leading
      model axes, e.g. a `FittedGrid` returns (n_steps, n_seeds, n, dim).
    - `pairs`: sequence of (t, s) with 0 <= s <= t (s > 0 for non-smooth data).
    - `key`: draws x ~ p_t; the same key gives the same draws (common random numbers).
    - `n`: draws per pair; `flow_kwargs`: passed to `flow_map` (tolerances).
    """
    pairs = [(float(t), float(s)) for t, s in pairs]
    if not pairs:
        raise ValueError("`pairs` must contain at least one (t, s) pair")
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"`n` must be an integer >= 2, got {n!r}")
    for t, s in pairs:
        check_times(t, s, s_positive=data.regime == "nonsmooth")
    means, ses = [], []
    for i, (t, s) in enumerate(pairs):
        x = data.marginal(t).sample(jax.random.fold_in(key, i), (n,))
        truth = flow_map(data, x, t, s, **flow_kwargs)
        pred = jnp.asarray(f(x, t, s), truth.dtype)
        sq = np.asarray(jnp.sum((pred - truth) ** 2, -1))
        if not np.all(np.isfinite(sq)):
            raise FloatingPointError(f"f returned non-finite values at (t, s) = ({t}, {s})")
        means.append(sq.mean(-1))
        ses.append(sq.std(-1, ddof=1) / np.sqrt(n))
    per_pair, stderr = np.stack(means, -1), np.stack(ses, -1)
    t_arr, s_arr = (np.array([p[i] for p in pairs]) for i in (0, 1))
    return ConsistencyError(t_arr, s_arr, per_pair, stderr, per_pair.mean(-1))
