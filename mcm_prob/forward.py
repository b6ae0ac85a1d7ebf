r"""The forward process as a NumPyro program: the default OU path and the joint model of (x_0, x_t).

$$dX_t = -X_t\,dt + \sqrt{2}\,dB_t, \qquad X_t = \alpha_t X_0 + \sigma_t Z,$$

with $\alpha_t = e^{-t}$, $\sigma_t = \sqrt{1 - e^{-2t}}$ and stationary law $N(0, I)$ (the
default path `OU`; every other Gaussian path is in `mcm_prob.paths`).
"""

from __future__ import annotations

import numpyro
from jaxtyping import Array, ArrayLike

from .paths import OU, AbstractPath, OrnsteinUhlenbeck, as_path

__all__ = [
    "OU",
    "OrnsteinUhlenbeck",
    "alpha",
    "sigma",
    "snr_ratio",
    "time_from_snr_ratio",
    "joint_model",
    "as_path",
]


def alpha(t: ArrayLike) -> Array:
    r"""$\alpha_t = e^{-t}$ (elementwise over any shape of `t`): `OU.a`."""
    return OU.a(t)


def sigma(t: ArrayLike) -> Array:
    r"""$\sigma_t = \sqrt{1 - e^{-2t}}$, computed as `sqrt(-expm1(-2t))` (relative accuracy for
    small t, $\sigma_t \approx \sqrt{2t}$, and large t, $\sigma_t \to 1$): `OU.b`."""
    return OU.b(t)


def snr_ratio(t: ArrayLike) -> Array:
    r"""$\rho_t = \sigma_t / \alpha_t = \sqrt{e^{2t} - 1}$ (OU): `OU.rho`."""
    return OU.rho(t)


def time_from_snr_ratio(rho: ArrayLike) -> Array:
    r"""Inverse of `snr_ratio`: $t = \tfrac12 \log(1 + \rho^2)$."""
    return OU.time_of_rho(rho)


def joint_model(data, t: ArrayLike, n: int | None = None, *, path: AbstractPath = OU) -> Array:
    r"""NumPyro program for $(X_0, X_t)$: site ``"x0"`` from `data.model(n)`, then site ``"xt"``
    from `path.model(x0, t)`. Works with `numpyro.handlers` and `numpyro.infer.Predictive`.

    `data` is any family of `mcm_prob.data`; returns x_t of shape (dim,) or (n, dim).
    """
    path = as_path(path)
    path.check_time("t", t)
    x0 = data.model(n)
    if n is None:
        return path.model(x0, t)
    with numpyro.plate("data", n):
        return path.model(x0, t)
