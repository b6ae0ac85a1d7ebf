"""Rank-normalised split R-hat and bulk ESS of many scalar quantities at once.

The error models judge convergence on every element of every posterior quantity (a few
thousand per fit). arviz-stats computes these diagnostics one element at a time in Python
(about 2.5 ms each); here every element is a row of one array and the work is a handful of
vectorised numpy/scipy calls, with arviz-stats's arithmetic (Vehtari et al. 2021,
"Rank-normalization, folding, and localization: an improved R-hat", Bayesian Analysis 16,
arXiv:1903.08008):

* split chains: (chain, draw) -> (2 chain, draw // 2), first halves then last halves;
* rank normalisation: z = Phi^{-1}((r - 3/8) / (N + 1/4)), r the average rank of a value
  among all N values of the split chains;
* R-hat: sqrt((B / W + n - 1) / n) on n draws per split chain, B = n Var(chain means),
  W = mean of the within-chain variances; rank R-hat = max(R-hat of z, R-hat of the z of
  |x - median x|);
* bulk ESS: M n / tau on z, tau = -1 + 2 sum_t rho_t from the chains' FFT autocovariances
  with Geyer's initial positive and initial monotone sequences.

Shapes: `a` (E, chain, draw) -> two (E,) arrays. A row with a NaN gives NaN (as
arviz-stats), so does R-hat with fewer than 2 chains and both with fewer than 4 draws. The
values equal arviz-stats's `rhat(method="rank")` and `ess(method="bulk")` to the last bit on
the tested arrays: the same ranks, the same Phi^{-1} inputs (looked up in a table of the
2N - 1 possible average ranks), and every sum taken in arviz-stats's order. Rows are
processed in blocks that stay in the CPU's cache; the rank normalisation of the split chains
is shared by R-hat and ESS.
"""

from __future__ import annotations

import numpy as np
from scipy import stats
from scipy.fft import next_fast_len

_BLOCK = 32  # rows per block (32 x 4 chains x 1000 draws: 1 MB of float64)


def rank_diagnostics(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rank-normalised split R-hat and bulk ESS of each row of `a` (E, chain, draw)."""
    a = np.asarray(a, dtype=float)
    if a.ndim != 3:
        raise ValueError(f"expected an array (element, chain, draw), got shape {a.shape}")
    e, chains, draws = a.shape
    r_hat, ess = np.full(e, np.nan), np.full(e, np.nan)
    if draws < 4 or e == 0:
        return r_hat, ess
    nan = np.isnan(a).any(axis=(1, 2))
    split = _split(np.where(nan[:, None, None], 0.0, a))
    ppf = _ppf_table(split.shape[1] * split.shape[2])
    with np.errstate(divide="ignore", invalid="ignore"):
        for lo in range(0, e, _BLOCK):
            block = split[lo : lo + _BLOCK]
            z = _z_scale(block, ppf)
            folded = np.abs(block - np.median(block, axis=(1, 2), keepdims=True))
            bulk, tail = _rhat(z), _rhat(_z_scale(folded, ppf))
            r_hat[lo : lo + _BLOCK] = np.where(tail > bulk, tail, bulk)  # Python's max
            ess[lo : lo + _BLOCK] = _ess(z)
    r_hat[nan | (chains < 2)] = np.nan
    ess[nan] = np.nan
    return r_hat, ess


def _split(a: np.ndarray) -> np.ndarray:
    """(E, chain, draw) -> (E, 2 chain, draw // 2)."""
    half = a.shape[2] // 2
    return np.concatenate([a[:, :, :half], a[:, :, a.shape[2] - half :]], axis=1)


def _ppf_table(size: int) -> np.ndarray:
    """Phi^{-1}((r - 3/8) / (size + 1/4)) for every average rank r = 1, 1.5, ..., size."""
    ranks = 1.0 + np.arange(2 * size - 1) / 2.0
    return stats.norm.ppf((ranks - 3 / 8) / (size - 2 * 3 / 8 + 1))


def _z_scale(a: np.ndarray, ppf: np.ndarray) -> np.ndarray:
    """Rank-normalised values of each row over all its chains and draws."""
    flat = a.reshape(a.shape[0], -1)
    ranks = stats.rankdata(flat, method="average", axis=1)
    return ppf[(2.0 * ranks - 2.0).astype(np.intp)].reshape(a.shape)


def _rhat(z: np.ndarray) -> np.ndarray:
    """Split R-hat of each row of `z` (E, M chains, n draws)."""
    n = z.shape[2]
    between = n * z.mean(axis=2).var(axis=1, ddof=1)
    within = z.var(axis=2, ddof=1).mean(axis=1)
    return np.sqrt((between / within + n - 1) / n)


def _ess(z: np.ndarray) -> np.ndarray:
    """Geyer-truncated ESS of each row of `z` (E, M chains, n draws)."""
    e, m, n = z.shape
    centred = z - z.mean(axis=2, keepdims=True)
    size = next_fast_len(2 * n, real=True)  # 5-smooth, as arviz-stats pads
    spec = np.fft.rfft(centred, n=size, axis=2)
    spec *= np.conjugate(spec)
    acov = np.fft.irfft(spec, n=size, axis=2)[:, :, :n]
    acov /= n
    # means over the chains, summed contiguously as arviz-stats sums a column (E, n)
    acov_mean = np.ascontiguousarray(np.moveaxis(acov, 1, 2)).mean(axis=2)
    mean_var = acov_mean[:, 0] * n / (n - 1.0)
    var_plus = mean_var * (n - 1.0) / n
    if m > 1:
        var_plus += z.mean(axis=2).var(axis=1, ddof=1)
    rho = 1.0 - (mean_var[:, None] - acov_mean) / var_plus[:, None]  # every lag

    # Geyer's initial positive sequence: pair k = (rho_2k, rho_2k+1), pair 0 = (1, rho_1);
    # pair k >= 1 is looked at while every earlier pair sum is > 0 and 2k - 1 < n - 3
    k_max = int(np.sum(2 * np.arange(1, n) - 1 < n - 3))
    pairs = np.concatenate([(1.0 + rho[:, 1])[:, None], rho[:, 2 : 2 * k_max + 2 : 2]], axis=1)
    pairs[:, 1:] += rho[:, 3 : 2 * k_max + 2 : 2]  # pair sums P_0 .. P_kmax
    stops = np.concatenate([~(pairs[:, :k_max] > 0), np.ones((e, 1), bool)], axis=1)
    last = stops.argmax(axis=1)  # the pairs looked at: up to the first sum <= 0, or k_max

    rho_t = np.zeros((e, n))
    rho_t[:, 0], rho_t[:, 1] = 1.0, rho[:, 1]
    k = np.arange(1, k_max + 1)
    keep = (k[None] < last[:, None]) | ((k[None] == last[:, None]) & (pairs[:, 1:] >= 0))
    rho_t[:, 2 : 2 * k_max + 2 : 2] = np.where(keep, rho[:, 2 : 2 * k_max + 2 : 2], 0.0)
    rho_t[:, 3 : 2 * k_max + 2 : 2] = np.where(keep, rho[:, 3 : 2 * k_max + 2 : 2], 0.0)
    rows = np.arange(e)
    even = np.where(last > 0, rho[rows, 2 * last], 1.0)
    rho_t[rows, 2 * last] = np.where(even > 0, even, rho_t[rows, 2 * last])

    # Geyer's initial monotone sequence on pairs 1 .. last - 1: a pair whose sum exceeds the
    # previous (already lowered) pair's is replaced by that pair's halves, so the sums are
    # the running minimum
    if k_max > 1:
        running = np.minimum.accumulate(pairs[:, : k_max - 1], axis=1)  # S_0 .. S_kmax-2
        j = np.arange(1, k_max)
        lower = (j[None] < last[:, None]) & (pairs[:, 1:k_max] > running)
        half = running / 2.0
        for col in (slice(2, 2 * k_max, 2), slice(3, 2 * k_max, 2)):
            rho_t[:, col] = np.where(lower, half, rho_t[:, col])

    total = np.empty(e)  # sum of rho_t[:2 last], per distinct `last`, contiguous like arviz
    for value in np.unique(last):
        at = last == value
        total[at] = rho_t[at, : 2 * value].sum(axis=1)
    tau = -1.0 + 2.0 * total + rho_t[rows, 2 * last]
    floor = 1 / np.log10(m * n)
    tau = np.where(floor > tau, floor, tau)
    ess = np.where(np.isnan(rho[:, 1]), np.nan, m * n / tau)
    constant = (z.max(axis=(1, 2)) - z.min(axis=(1, 2))) < np.finfo(float).resolution
    return np.where(constant, float(m * n), ess)
