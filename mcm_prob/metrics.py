r"""Metrics: consistency error of any f(x, t, s) against the exact flow map.

$$\mathcal E(t, s) = E_{x\sim p_t}\,\|f(x, t, s) - \Phi_{t\to s}(x)\|^2,$$

estimated on n exact draws of $p_t$ per (t, s) pair. The draws depend only on `key` and the
pair index, so every model evaluated with the same key sees the same points (common random
numbers): differences between models (e.g. between Delta values) are not swamped by sampling
noise.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._checks import check_times
from .data import DataDistribution
from .flow import flow_map

__all__ = ["ConsistencyError", "consistency_error", "default_time_pairs"]


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
