r"""Metrics: distances between Gaussian laws, and consistency error against the exact flow map.

Gaussian laws (closed forms, numpy float64): `kl_gaussian` and `w2_gaussian`; per eigenvalue,
O(d), when both laws are `EigenNormal`s in one basis (the exact laws of Gaussian data built from
eigenvalues), with dense matrices otherwise.

Sample-based, each with a standard error: `kl_knn` (KL(q || p) from samples of q and the exact
log p), `energy_distance` and `mmd2` (unbiased two-sample U-statistics), and `memorisation`
(how close samples come to the training set, relative to its own spacing).

Consistency error of any f(x, t, s):

$$\mathcal E(t, s) = E_{x\sim p_t}\,\|f(x, t, s) - \Phi_{t\to s}(x)\|^2,$$

estimated on n exact draws of $p_t$ per (t, s) pair. The draws depend only on `key` and the
pair index, so every model evaluated with the same key sees the same points (common random
numbers): differences between models (e.g. between Delta values) are not swamped by sampling
noise.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._checks import integer, number, prng_key
from .data import DataDistribution, EigenNormal
from .flow import flow_map
from .paths import OU, AbstractPath, as_path

__all__ = [
    "kl_gaussian",
    "w2_gaussian",
    "Estimate",
    "kl_knn",
    "energy_distance",
    "mmd2",
    "memorisation",
    "ConsistencyError",
    "consistency_error",
    "reference_flows",
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


def _same_basis(p, q):
    """(coef_p, var_p, coef_q, var_q) when both laws are `EigenNormal`s in one basis, else None."""
    if not (isinstance(p, EigenNormal) and isinstance(q, EigenNormal)):
        return None
    if (p.basis is None) != (q.basis is None):
        return None
    if p.basis is not None and p.basis is not q.basis and not np.array_equal(p.basis, q.basis):
        return None
    parts = tuple(np.asarray(v, np.float64) for v in (p.coef, p.var, q.coef, q.var))
    if parts[0].shape != parts[2].shape:
        raise ValueError(
            f"`p` and `q` must have the same dimension, got {parts[0].size} and {parts[2].size}"
        )
    if not all(np.all(np.isfinite(v)) for v in parts):
        raise ValueError("`p` or `q` has non-finite parameters")
    return parts


def kl_gaussian(p, q) -> float:
    r"""$KL(p\,\|\,q)$ for two Gaussian laws (numpyro `MultivariateNormal`), in float64.

    With $L_q$ the Cholesky factor of $\Sigma_q$ and $e_i$ the eigenvalues of
    $M = L_q^{-1}\Sigma_p L_q^{-\top}$,
    $KL = \tfrac12\big[\sum_i (e_i - 1 - \log e_i) + \|L_q^{-1}(\mu_q - \mu_p)\|^2\big]$, where
    $u - \log(1 + u)$ is evaluated on $u_i = e_i - 1$ (eigenvalues of $M - I$) so that tiny
    KL values (1e-20, say) keep their relative accuracy instead of cancelling.
    """
    eigen = _same_basis(p, q)
    if eigen is not None:  # per eigenvalue: u_i = v_p / v_q - 1
        cp_, vp, cq_, vq = eigen
        u = (vp - vq) / vq
        return 0.5 * float(np.sum(u - np.log1p(u)) + np.sum((cq_ - cp_) ** 2 / vq))
    mp_, cp = _moments(p, "p")
    mq, cq = _moments(q, "q")
    if mp_.size != mq.size:
        raise ValueError(f"`p` and `q` must have the same dimension, got {mp_.size} and {mq.size}")
    try:
        lq = np.linalg.cholesky(cq)
    except np.linalg.LinAlgError:
        raise ValueError(
            "`q` must have a positive-definite covariance; its smallest eigenvalue is "
            f"{np.linalg.eigvalsh(cq)[0]:.3g} (a law that has collapsed or lost float64 "
            "precision: shorten the schedule or check its parameters)"
        ) from None
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
    eigen = _same_basis(p, q)
    if eigen is not None:
        cp_, vp, cq_, vq = eigen
        return math.sqrt(float(np.sum((cp_ - cq_) ** 2) + np.sum((np.sqrt(vp) - np.sqrt(vq)) ** 2)))
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


def reference_flows(
    data: DataDistribution,
    pairs,
    *,
    key: jax.Array,
    n: int = 2048,
    path: AbstractPath = OU,
    **flow_kwargs,
):
    """Evaluation draws and exact flows for `consistency_error`: a list of (x, Phi_{t->s}(x)),
    x ~ p_t on `path` (n draws from `fold_in(key, pair index)`), one entry per (t, s) pair.
    Compute once and pass as `reference=` to evaluate many models on the same points."""
    pairs = [(float(t), float(s)) for t, s in pairs]
    if not pairs:
        raise ValueError("`pairs` must contain at least one (t, s) pair")
    n, key, path = integer("n", n, ge=2), prng_key("key", key), as_path(path)
    for t, s in pairs:
        path.check_times(t, s, s_positive=data.regime == "nonsmooth")
    out = []
    for i, (t, s) in enumerate(pairs):
        x = data.marginal(t, path).sample(jax.random.fold_in(key, i), (n,))
        out.append((x, flow_map(data, x, t, s, path=path, **flow_kwargs)))
    return out


def consistency_error(
    f,
    data: DataDistribution,
    pairs,
    *,
    key: jax.Array,
    n: int = 2048,
    reference=None,
    path: AbstractPath | None = None,
    **flow_kwargs,
) -> ConsistencyError:
    """Consistency error of `f` against the exact flow map of `data` on (t, s) `pairs`.

    **Arguments:**
    - `f`: any callable f(x, t, s) with x of shape (n, dim); its output may carry extra leading
      model axes, e.g. a `FittedGrid` returns (n_steps, n_seeds, n, dim).
    - `pairs`: sequence of (t, s) with 0 <= s <= t (s > 0 for non-smooth data).
    - `key`: draws x ~ p_t; the same key gives the same draws (common random numbers).
    - `n`: draws per pair; `flow_kwargs`: passed to `flow_map` (tolerances).
    - `reference`: the output of `reference_flows` for these pairs (skips recomputing them).
    - `path`: the Gaussian path of the times (default: the path `f` was trained on, ``f.path``,
      else OU).
    """
    pairs = [(float(t), float(s)) for t, s in pairs]
    if reference is None:
        path = as_path(path, f)
        reference = reference_flows(data, pairs, key=key, n=n, path=path, **flow_kwargs)
    if len(reference) != len(pairs):
        raise ValueError(f"`reference` has {len(reference)} entries for {len(pairs)} pairs")
    means, ses = [], []
    for (t, s), (x, truth) in zip(pairs, reference, strict=True):
        pred = jnp.asarray(f(x, t, s), truth.dtype)
        sq = np.asarray(jnp.sum((pred - truth) ** 2, -1))
        if not np.all(np.isfinite(sq)):
            raise FloatingPointError(f"f returned non-finite values at (t, s) = ({t}, {s})")
        means.append(sq.mean(-1))
        ses.append(sq.std(-1, ddof=1) / np.sqrt(sq.shape[-1]))
    per_pair, stderr = np.stack(means, -1), np.stack(ses, -1)
    t_arr, s_arr = (np.array([p[i] for p in pairs]) for i in (0, 1))
    return ConsistencyError(t_arr, s_arr, per_pair, stderr, per_pair.mean(-1))


# ------------------------------------------------------------------ sample-based estimators
class Estimate(NamedTuple):
    """A point estimate and its standard error (how it is obtained is said by each estimator)."""

    value: float
    stderr: float


def _points(name: str, x, dim: int | None = None) -> np.ndarray:
    """Sample sets of shape (..., n, dim) with n >= 3, finite, as float64."""
    arr = np.asarray(x, np.float64)
    if arr.ndim < 2 or arr.shape[-2] < 3:
        raise ValueError(
            f"`{name}` must have shape (n, dim) or (..., n, dim) with n >= 3, got {arr.shape}"
        )
    if dim is not None and arr.shape[-1] != dim:
        raise ValueError(f"`{name}` must have dimension {dim}, got {arr.shape[-1]}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"`{name}` must be finite")
    return arr


def _estimate(value, stderr, batch: tuple) -> Estimate:
    """Floats for one sample set, arrays of shape `batch` for a grid of them."""
    value, stderr = np.asarray(value, np.float64), np.asarray(stderr, np.float64)
    if batch:
        return Estimate(value.reshape(batch), stderr.reshape(batch))
    return Estimate(float(value[0]), float(stderr[0]))


# Rows of one block of a pairwise matrix: a (256, n) float64 block stays in a CPU's cache.
_BLOCK = 256


def _sq_dists(a: jax.Array, b: jax.Array) -> jax.Array:
    """(n, d), (m, d) -> (n, m) squared distances |a|^2 + |b|^2 - 2 a.b, clamped at 0."""
    cross = jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.maximum(jnp.sum(a * a, -1)[:, None] + jnp.sum(b * b, -1)[None, :] - 2 * cross, 0)


def _by_blocks(fn, a: jax.Array):
    """`fn(block, rows)` over row blocks of a (n, d), zero-padded to whole blocks; `rows` are
    the block's row indices (>= n: padding). Returns the stacked outputs, (n_blocks, ...)."""
    n = a.shape[0]
    nb = -(-n // _BLOCK)
    padded = jnp.concatenate([a, jnp.zeros((nb * _BLOCK - n, a.shape[1]), a.dtype)])
    rows = jnp.arange(nb * _BLOCK).reshape(nb, _BLOCK)
    return jax.lax.map(lambda br: fn(*br), (padded.reshape(nb, _BLOCK, -1), rows))


def _over_sets(fn, *arrays):
    """`fn` over the leading (sample-set) axis: one set at a time on a CPU (cache-sized
    blocks), 64 at a time on an accelerator."""
    batch = 1 if jax.default_backend() == "cpu" else 64
    return jax.lax.map(lambda a: fn(*a), arrays, batch_size=min(batch, arrays[0].shape[0]))


def _kth_neighbour(x: jax.Array, k: int) -> jax.Array:
    """(n, d) -> (n,) index of each point's k-th nearest other point (ties counted with their
    multiplicity, as a k-d tree counts them)."""
    n = x.shape[0]

    def block(b, rows):
        d2 = jnp.where(rows[:, None] == jnp.arange(n), jnp.inf, _sq_dists(b, x))

        def smallest(_, carry):  # next distinct value above `prev`, and how many so far
            prev, taken, kth = carry
            m = jnp.min(jnp.where(d2 > prev[:, None], d2, jnp.inf), 1)
            now = taken + jnp.sum(d2 == m[:, None], 1)
            return m, now, jnp.where((taken < k) & (now >= k), m, kth)

        z = jnp.zeros(_BLOCK, d2.dtype)
        init = (z - 1, jnp.zeros(_BLOCK, int), z)
        kth = jax.lax.fori_loop(0, k, smallest, init, unroll=True)[2]
        return jnp.argmax(d2 == kth[:, None], 1)

    return _by_blocks(block, x).reshape(-1)[:n]


@functools.partial(jax.jit, static_argnames="k")
def _knn_log_eps(x: jax.Array, k: int) -> jax.Array:
    """(B, n, d) -> (B, n): log of each point's distance to its k-th nearest other point. The
    neighbour is chosen on squared distances and its distance recomputed from the difference
    (no cancellation)."""

    def one(xi):
        return 0.5 * jnp.log(jnp.sum((xi - xi[_kth_neighbour(xi, k)]) ** 2, -1))

    return _over_sets(one, x)


# Points per call of a log-density in `kl_knn`: a mixture's log-density holds a (points,
# components, dim) array, so a grid of sample sets in one call can need more memory than a
# GPU has (the digits study's empirical measure: 90,000 points x 1,797 atoms x 64 pixels in
# float64, 82 GiB); 2048 points of it are 1.9 GB.
_LOG_P_POINTS = 2048


def _log_density(log_p, x: np.ndarray) -> np.ndarray:
    """`log_p` at the points x (N, dim), in calls of `_LOG_P_POINTS` points (the last call
    padded by repeating its last point, so that every call has one shape), as float64 (N,)."""
    out = []
    for start in range(0, x.shape[0], _LOG_P_POINTS):
        part = x[start : start + _LOG_P_POINTS]
        pad = _LOG_P_POINTS - part.shape[0] if x.shape[0] > _LOG_P_POINTS else 0
        padded = np.concatenate([part, np.repeat(part[-1:], pad, axis=0)])
        value = np.asarray(log_p(jnp.asarray(padded)), np.float64)
        if value.shape != padded.shape[:-1] or not np.all(np.isfinite(value)):
            raise ValueError(
                f"`log_p` must return finite values of shape {padded.shape[:-1]} for points "
                f"of shape {padded.shape}"
            )
        out.append(value[: part.shape[0]])
    return np.concatenate(out)


def kl_knn(samples, log_p, *, k: int = 5) -> Estimate:
    r"""KL(q || p) from samples of q and the exact log-density of p:
    $\widehat{KL} = -\hat H_{KL}(q) - \frac1n\sum_i \log p(x_i)$ with the Kozachenko-Leonenko
    k-NN entropy estimate $\hat H = \psi(n) - \psi(k) + \log V_d + \frac dn \sum_i \log\varepsilon_i$
    ($\varepsilon_i$: distance to the k-th neighbour, $V_d$: unit-ball volume).

    `samples`: (n, dim), or (..., n, dim) for a grid of sample sets estimated in one compiled
    program (then the Estimate holds arrays of shape ``...``). `log_p` maps (..., n, dim) to
    (..., n), e.g. `data.marginal(delta).log_prob`; it is called on at most 2048 points at a
    time (shape (N, dim)), so a grid of sample sets fits in memory. The standard error is that
    of the mean of the per-point terms $-d\log\varepsilon_i - \log p(x_i)$ (it ignores the
    weak dependence between neighbour distances). The estimator has an O(n^{-1/d}) bias. The
    neighbours are those of a k-d tree (scipy's, tested).
    """
    from scipy.special import digamma, gammaln

    x = _points("samples", samples)
    *batch, n, d = x.shape
    k = integer("k", k, ge=1, lt=n)
    log_eps = np.asarray(_knn_log_eps(jnp.asarray(x.reshape(-1, n, d)), k))
    if not np.all(np.isfinite(log_eps)):
        raise ValueError(
            "`samples` contain duplicate points: the k-NN entropy estimate needs a density"
        )
    logp = _log_density(log_p, x.reshape(-1, d))
    terms = -d * log_eps - logp.reshape(-1, n)
    const = -(digamma(n) - digamma(k) + 0.5 * d * np.log(np.pi) - gammaln(0.5 * d + 1))
    return _estimate(const + terms.mean(-1), terms.std(-1, ddof=1) / np.sqrt(n), tuple(batch))


def _pair_sums(a: jax.Array, b: jax.Array, kernel, same: bool):
    """Row sums (n,) and column sums (m,) of K_ij = kernel(|a_i - b_j|^2), by row blocks;
    with `same` (b is a) the diagonal is left out."""
    n, cols = a.shape[0], jnp.arange(b.shape[0])

    def block(blk, rows):
        keep = rows[:, None] < n
        if same:
            keep &= rows[:, None] != cols
        kij = jnp.where(keep, kernel(_sq_dists(blk, b)), 0)
        return kij.sum(1), kij.sum(0)

    row, col = _by_blocks(block, a)
    return row.reshape(-1)[:n], col.sum(0)


def _two_sample_u(rxx, ryy, rxy, cxy) -> tuple[jax.Array, jax.Array]:
    r"""Unbiased $E k(X,X') + E k(Y,Y') - 2E k(X,Y)$ and its delete-one jackknife SE, from
    the row sums of $k(x_i, x_j)$ and $k(y_i, y_j)$ over $j \ne i$ and the row and column sums
    of $k(x_i, y_j)$."""
    n, m = rxx.shape[0], ryy.shape[0]
    sxx, syy, sxy = rxx.sum(), ryy.sum(), rxy.sum()
    value = sxx / (n * (n - 1)) + syy / (m * (m - 1)) - 2 * sxy / (n * m)
    loo_x = (
        (sxx - 2 * rxx) / ((n - 1) * (n - 2))
        + syy / (m * (m - 1))
        - 2 * (sxy - rxy) / ((n - 1) * m)
    )
    loo_y = (
        sxx / (n * (n - 1))
        + (syy - 2 * ryy) / ((m - 1) * (m - 2))
        - 2 * (sxy - cxy) / (n * (m - 1))
    )
    var = (n - 1) / n * jnp.sum((loo_x - loo_x.mean()) ** 2) + (m - 1) / m * jnp.sum(
        (loo_y - loo_y.mean()) ** 2
    )
    return value, jnp.sqrt(var)


def _u_statistic(x: jax.Array, y: jax.Array, kernel) -> tuple[jax.Array, jax.Array]:
    """`_two_sample_u` of one pair of sample sets for a kernel of the squared distance."""
    rxx, _ = _pair_sums(x, x, kernel, True)
    ryy, _ = _pair_sums(y, y, kernel, True)
    return _two_sample_u(rxx, ryy, *_pair_sums(x, y, kernel, False))


@jax.jit
def _energy(x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(B, n, d), (B, m, d) -> value and jackknife SE, each (B,)."""
    return _over_sets(lambda a, b: _u_statistic(a, b, lambda d2: -jnp.sqrt(d2)), x, y)


def _pairs(x, y) -> tuple[np.ndarray, np.ndarray, tuple]:
    """Validated sample sets with broadcast leading shapes, flattened to (B, n, d), (B, m, d)."""
    x = _points("x", x)
    y = _points("y", y, x.shape[-1])
    batch = np.broadcast_shapes(x.shape[:-2], y.shape[:-2])
    x = np.broadcast_to(x, (*batch, *x.shape[-2:])).reshape(-1, *x.shape[-2:])
    y = np.broadcast_to(y, (*batch, *y.shape[-2:])).reshape(-1, *y.shape[-2:])
    return x, y, tuple(batch)


def energy_distance(x, y) -> Estimate:
    r"""Unbiased energy distance $2E\|X - Y\| - E\|X - X'\| - E\|Y - Y'\|$ (U-statistics) between
    sample sets of shapes (n, d) and (m, d), with a delete-one jackknife standard error.
    Leading axes (..., n, d) and (..., m, d), broadcast against each other, give a grid of
    estimates from one compiled program (arrays of the broadcast shape). Equal to the
    U-statistic on scipy's pairwise distances to round-off (tested)."""
    x, y, batch = _pairs(x, y)
    return _estimate(*_energy(jnp.asarray(x), jnp.asarray(y)), batch)


@jax.jit
def _mmd2(x: jax.Array, y: jax.Array, bandwidth: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One pair of sample sets; `bandwidth` <= 0 means the pooled median distance."""
    n, m = x.shape[0], y.shape[0]
    dxx, dyy = _sq_dists(x, x), _sq_dists(y, y)
    pooled = jnp.concatenate(
        [dxx[jnp.triu_indices(n, 1)], dyy[jnp.triu_indices(m, 1)], _sq_dists(x, y).ravel()]
    )
    ell2 = jnp.where(bandwidth > 0, bandwidth**2, jnp.median(pooled))
    return _u_statistic(x, y, lambda d2: jnp.exp(-d2 / (2 * ell2)))


def mmd2(x, y, *, bandwidth: float | None = None) -> Estimate:
    r"""Unbiased squared MMD with the Gaussian kernel $k(a,b) = \exp(-\|a-b\|^2 / (2\ell^2))$;
    $\ell$ = `bandwidth` or the median pairwise distance of the pooled sample (median
    heuristic). Delete-one jackknife standard error. May be negative (it is unbiased).
    `x`: (n, d), `y`: (m, d)."""
    x = _points("x", x)
    y = _points("y", y, x.shape[-1])
    if x.ndim != 2 or y.ndim != 2:
        raise ValueError(f"`x` and `y` must have shape (n, dim), got {x.shape} and {y.shape}")
    ell = 0.0 if bandwidth is None else number("bandwidth", bandwidth, gt=0)
    value, stderr = _mmd2(jnp.asarray(x), jnp.asarray(y), jnp.asarray(ell, jnp.float64))
    return Estimate(float(value), float(stderr))


@jax.jit
def _nearest_distances(x: jax.Array, train: jax.Array) -> jax.Array:
    """(B, n, d), (K, d) -> (B, n): each point's distance to its nearest training point (chosen
    on squared distances, recomputed from the difference: exact 0 for a copy)."""

    def one(xi):
        def block(b, _):
            near = jnp.argmin(_sq_dists(b, train), 1)
            return jnp.sqrt(jnp.sum((b - train[near]) ** 2, -1))

        return _by_blocks(block, xi).reshape(-1)[: xi.shape[0]]

    return _over_sets(one, x)


@jax.jit
def _spacing(train: jax.Array) -> jax.Array:
    """Mean distance of each training point to its nearest other training point."""
    return jnp.mean(jnp.sqrt(jnp.sum((train - train[_kth_neighbour(train, 1)]) ** 2, -1)))


def memorisation(samples, train) -> Estimate:
    r"""How far samples are from the training set, relative to the set's own spacing:

    $$r = \frac{\frac1n\sum_i \min_j \|x_i - a_j\|}{\frac1K\sum_j \min_{k\ne j}\|a_j - a_k\|}$$

    for samples $x_i$ (shape (n, d), or (..., n, d) for a grid of sample sets) and training
    points $a_j$ (shape (K, d), K >= 2). r is about 1 for new samples from the training
    distribution (a held-out image is as far from the training set as a training image from
    the others) and 0 for copies of training points (the exact flow of an empirical measure
    returns them). Standard error: that of the numerator's mean over the n samples (the
    training set is fixed), divided by the denominator. Distances are exact for copies (the
    nearest point is chosen on squared distances, the distance recomputed from the difference).
    """
    train = _points("train", train)
    if train.ndim != 2:
        raise ValueError(f"`train` must have shape (K, dim), got {train.shape}")
    x = _points("samples", samples, train.shape[-1])
    batch = x.shape[:-2]
    near = np.asarray(_nearest_distances(jnp.asarray(x.reshape(-1, *x.shape[-2:])), train))
    spacing = float(_spacing(jnp.asarray(train)))
    if spacing == 0:
        raise ValueError("`train` has no two distinct points: its spacing is 0")
    n = near.shape[-1]
    value = near.mean(-1) / spacing
    stderr = near.std(-1, ddof=1) / math.sqrt(n) / spacing
    return _estimate(value, stderr, tuple(batch))
