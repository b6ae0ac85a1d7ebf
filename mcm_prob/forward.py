r"""The forward process: Ornstein-Uhlenbeck noising as a NumPyro program.

$$dX_t = -X_t\,dt + \sqrt{2}\,dB_t, \qquad X_t = \alpha_t X_0 + \sigma_t Z,$$

with $\alpha_t = e^{-t}$, $\sigma_t = \sqrt{1 - e^{-2t}}$ and stationary law $N(0, I)$. The
transition from time $s$ to $t \ge s$ is $X_t = \alpha_{t-s} X_s + \sigma_{t-s} \xi$.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from jaxtyping import Array, ArrayLike

from ._checks import check_time, check_times, concrete, prng_key


def alpha(t: ArrayLike) -> Array:
    r"""$\alpha_t = e^{-t}$ (elementwise over any shape of `t`)."""
    return jnp.exp(-jnp.asarray(t))


def sigma(t: ArrayLike) -> Array:
    r"""$\sigma_t = \sqrt{1 - e^{-2t}}$, computed as `sqrt(-expm1(-2t))`.

    Relative accuracy is kept both for small t ($\sigma_t \approx \sqrt{2t}$) and large t
    ($\sigma_t \to 1$).
    """
    return jnp.sqrt(-jnp.expm1(-2.0 * jnp.asarray(t)))


def snr_ratio(t: ArrayLike) -> Array:
    r"""$\rho_t = \sigma_t / \alpha_t = \sqrt{e^{2t} - 1}$, the noise level of the rescaled
    variable $X_t / \alpha_t = X_0 + \rho_t Z$ (variance-exploding form)."""
    return jnp.sqrt(jnp.expm1(2.0 * jnp.asarray(t)))


def time_from_snr_ratio(rho: ArrayLike) -> Array:
    r"""Inverse of `snr_ratio`: $t = \tfrac12 \log(1 + \rho^2)$."""
    return 0.5 * jnp.log1p(jnp.square(jnp.asarray(rho)))


class OrnsteinUhlenbeck(eqx.Module):
    """The OU forward process (docs/conventions.md). Use the module-level instance `mcm_prob.OU`."""

    def alpha(self, t: ArrayLike) -> Array:
        r"""$\alpha_t = e^{-t}$."""
        return alpha(t)

    def sigma(self, t: ArrayLike) -> Array:
        r"""$\sigma_t = \sqrt{1 - e^{-2t}}$."""
        return sigma(t)

    def transition_coefficients(self, s: ArrayLike, t: ArrayLike) -> tuple[Array, Array]:
        r"""$(\alpha_{t-s}, \sigma_{t-s})$: $X_t = \alpha_{t-s} X_s + \sigma_{t-s}\xi$, $0\le s\le t$."""
        check_times(t, s)
        dt = jnp.asarray(t) - jnp.asarray(s)
        return alpha(dt), sigma(dt)

    def transition(self, x_s: ArrayLike, s: ArrayLike, t: ArrayLike) -> dist.Distribution:
        r"""Law of $X_t$ given $X_s = x_s$: $N(\alpha_{t-s} x_s, \sigma_{t-s}^2 I)$.

        `x_s` has shape (..., dim); the result has event shape (dim,) and batch shape (...).
        For t == s (concrete) it is a point mass at `x_s`.
        """
        a, sd = self.transition_coefficients(s, t)
        x_s = jnp.asarray(x_s)
        if x_s.ndim == 0:
            raise ValueError(f"`x_s` must have a trailing data dimension, got shape {x_s.shape}")
        return _gaussian_kernel(a * x_s, sd, concrete(jnp.asarray(t) - jnp.asarray(s)))

    def model(self, x0: ArrayLike, t: ArrayLike) -> Array:
        r"""NumPyro program: sample site ``"xt"`` $\sim N(\alpha_t x_0, \sigma_t^2 I)$.

        `x0` has shape (..., dim) (e.g. (n, dim) inside a data plate); returns x_t of the same
        shape. At t == 0 (concrete) the site is a point mass at x0.
        """
        check_time("t", t)
        x0 = jnp.asarray(x0)
        if x0.ndim == 0:
            raise ValueError(f"`x0` must have a trailing data dimension, got shape {x0.shape}")
        return numpyro.sample("xt", _gaussian_kernel(alpha(t) * x0, sigma(t), concrete(t)))

    def sample(self, key: Array, x0: ArrayLike, t: ArrayLike) -> Array:
        """Draw x_t given x_0 with an explicit key; shape of `x0`."""
        check_time("t", t)
        x0 = jnp.asarray(x0)
        noise = jax.random.normal(prng_key("key", key), x0.shape, x0.dtype)
        return alpha(t) * x0 + sigma(t) * noise


def _gaussian_kernel(loc: Array, scale: Array, dt_concrete) -> dist.Distribution:
    if dt_concrete is not None and dt_concrete == 0:
        return dist.Delta(loc, event_dim=1)
    return dist.Normal(loc, jnp.broadcast_to(scale, loc.shape)).to_event(1)


OU = OrnsteinUhlenbeck()
"""The forward process instance (docs/conventions.md)."""


def joint_model(data, t: ArrayLike, n: int | None = None) -> Array:
    r"""NumPyro program for $(X_0, X_t)$: site ``"x0"`` from `data.model(n)`, then site ``"xt"``
    from `OU.model(x0, t)`. Works with `numpyro.handlers` and `numpyro.infer.Predictive`.

    `data` is any family of `mcm_prob.data`; returns x_t of shape (dim,) or (n, dim).
    """
    check_time("t", t)
    x0 = data.model(n)
    if n is None:
        return OU.model(x0, t)
    with numpyro.plate("data", n):
        return OU.model(x0, t)
