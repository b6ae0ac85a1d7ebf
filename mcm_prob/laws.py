r"""Exact Gaussian laws, per eigenvalue: the laws of the samplers and baselines on Gaussian data.

This module holds the parts every exact Gaussian law shares: `gaussian_parts` (mean, eigenvalues
and basis of Gaussian data), `eigen_law_moments` (the exact-flow sampler, per eigenvalue),
`gaussian_law_moments` (the same with an affine consistency error, d x d, numpy or jax.numpy),
`compose_affine` (K coordinatewise affine-Gaussian steps at once: the baselines); the laws are
returned by `mcm_prob.sampler_law` and `mcm_prob.diffusion.baseline_law`.

For Gaussian data $N(m, U\operatorname{diag}(\lambda)U^\top)$ and any Gaussian path, the exact
flow, the re-noising transitions and the fixed-step baselines with the exact score are all
affine maps plus isotropic Gaussian noise that are diagonal in the eigenbasis U. So a law
reached from an isotropic start is $N(U\mu, U\operatorname{diag}(v)U^\top)$ with $\mu, v$
propagated coordinate by coordinate: O(K d) for K steps in dimension d, no d x d matrix.
`EigenNormal` is that law: a `numpyro.distributions.MultivariateNormal` whose dense
`covariance_matrix` and `scale_tril` are formed only on demand, with O(d) `mean`, `variance`,
`sample` and `log_prob`; `mcm_prob.metrics.kl_gaussian` and `w2_gaussian` use the eigenvalues
directly when both laws are diagonal in one basis.
"""

from __future__ import annotations

import math

import jax
import numpy as np

from .data import ClosedFormGaussian, EigenNormal
from .paths import OU, AbstractPath

__all__ = [
    "EigenNormal",
    "gaussian_parts",
    "compose_affine",
    "eigen_law_moments",
    "gaussian_law_moments",
]


def gaussian_parts(data) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(mean in the eigenbasis (d,), eigenvalues (d,), eigenvectors (d, d) or None for the
    standard basis) of Gaussian data (`mcm_prob.data.ClosedFormGaussian`), in numpy float64."""
    if not isinstance(data, ClosedFormGaussian):
        raise TypeError(
            "`data` must be Gaussian (mcm_prob.data.Gaussian or another ClosedFormGaussian), "
            f"got {type(data).__name__}"
        )
    m = np.asarray(data.mean, np.float64)
    lam = np.asarray(data.eigvals, np.float64)
    u = None if data.eigvecs is None else np.asarray(data.eigvecs, np.float64)
    return (m if u is None else u.T @ m), lam, u


def compose_affine(a, c, q, mean0, var0):
    r"""Compose K coordinatewise steps $z' = a_k z + c_k + \sqrt{q_k}\,\xi_k$ (arrays (K, d)) from
    $z_0 \sim N(\mu_0, v_0)$: $z_K = \sum_k (\prod_{j>k} a_j)(c_k + \sqrt{q_k}\xi_k) +
    (\prod_k a_k) z_0$, by cumulative products (no loop). Returns (mean (d,), var (d,))."""
    after = np.concatenate([np.cumprod(a[::-1], 0)[::-1][1:], np.ones_like(a[:1])])
    total = np.prod(a, 0)
    return np.sum(after * c, 0) + total * mean0, total**2 * var0 + np.sum(after**2 * q, 0)


def on_time_grid(fn, *times):
    """`fn(*times)` for numpy time arrays of one shape (a path's coefficients, which are eager
    JAX operations), as numpy arrays of that shape (a tuple where `fn` returns one).

    The times are flattened and padded with their last value to a power of two (at least 8),
    so that the operations compile once per power of two instead of once per grid length: a
    step search (`mcm_prob.accuracy`) asks for the laws of dozens of step counts K, and each
    K compiled its own operations (about 450 compilations, 16 s of a small sampling study's
    37 s on 2 CPU cores). The operations are elementwise, so the values are those of the
    unpadded call (tested)."""
    shape = np.shape(times[0])
    n = math.prod(shape)
    if n == 0:
        return jax.tree_util.tree_map(np.asarray, fn(*times))
    size = max(8, 1 << (n - 1).bit_length())
    padded = (np.concatenate([np.ravel(t), np.full(size - n, np.ravel(t)[-1])]) for t in times)
    return jax.tree_util.tree_map(lambda v: np.asarray(v)[:n].reshape(shape), fn(*padded))


def eigen_law_moments(m, lam, t, s, path: AbstractPath = OU, mean0=None, var0=None):
    """Per-eigenvalue mean (d,) and variance (d,) of the exact-flow sampler law, for the data
    mean `m` in the eigenbasis, eigenvalues `lam`, start and landing times `t`, `s` (K,), from
    N(mean0, var0) (default the prior N(0, I))."""
    mu = np.zeros_like(m) if mean0 is None else mean0
    var = np.ones_like(lam) if var0 is None else var0
    a_t, b_t = on_time_grid(lambda t: (path.a(t), path.b(t)), t)
    a_s, b_s = on_time_grid(lambda s: (path.a(s), path.b(s)), s)
    ratio, std = on_time_grid(path.transition_coefficients, s[:-1], t[1:])
    for k in range(t.shape[0]):
        flow = np.sqrt((a_s[k] ** 2 * lam + b_s[k] ** 2) / (a_t[k] ** 2 * lam + b_t[k] ** 2))
        mu, var = flow * (mu - a_t[k] * m) + a_s[k] * m, flow**2 * var
        if k < t.shape[0] - 1:
            mu, var = ratio[k] * mu, ratio[k] ** 2 * var + std[k] ** 2
    return mu, var


def gaussian_law_moments(xp, m, lam, u, t, s, perturbation=None, *, path=OU, init=None):
    """Mean (d,) and covariance (d, d) of the sampler law of `sampler_law` for data mean `m`,
    covariance eigenvalues `lam` and eigenvectors `u`, start and landing times `t`, `s` (K,),
    in the array namespace `xp` (numpy for float64 ground truth; jax.numpy to differentiate with
    respect to the times); `init` = (mean, cov) at t_0 (default N(0, I))."""
    d, steps = m.shape[0], t.shape[0]
    mu, cov = (xp.zeros(d), xp.eye(d)) if init is None else init
    ratio, std = path.transition_coefficients(s[:-1], t[1:]) if steps > 1 else (None, None)
    for k in range(steps):
        a_t, a_s = path.a(t[k]), path.a(s[k])
        nu_t = a_t**2 * lam + path.b(t[k]) ** 2
        nu_s = a_s**2 * lam + path.b(s[k]) ** 2
        flow = (u * xp.sqrt(nu_s / nu_t)) @ u.T
        lin, shift = flow, a_s * m - flow @ (a_t * m)
        if perturbation is not None:
            lin, shift = lin + perturbation[0], shift + perturbation[1]
        mu, cov = lin @ mu + shift, lin @ cov @ lin.T
        if k < steps - 1:
            mu, cov = ratio[k] * mu, ratio[k] ** 2 * cov + std[k] ** 2 * xp.eye(d)
    return mu, cov
