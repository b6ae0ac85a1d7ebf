r"""Exact Gaussian laws, per eigenvalue: the laws of the samplers and baselines on Gaussian data.

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

import numpy as np

from .data import ClosedFormGaussian, EigenNormal

__all__ = ["EigenNormal", "gaussian_parts", "compose_affine"]


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
