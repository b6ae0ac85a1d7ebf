r"""Neural two-time consistency functions $f_\theta(x, t, s)$ with the boundary condition built in.

The CTM/DDIM parameterisation on a Gaussian path $x_t = a_t x_0 + b_t z$ (OU: $a = \alpha$,
$b = \sigma$): with a network $g_\theta$ acting as a denoiser ($x_0$-prediction),

$$f_\theta(x, t, s) = \frac{b_s}{b_t}\,x + \Big(a_s - a_t\frac{b_s}{b_t}\Big)
g_\theta(x, t, s),$$

which is one DDIM step from t to s. At s = t the skip coefficient is exactly 1 and the output
coefficient exactly 0, so $f_\theta(x, t, t) = x$ for every parameter value (in floating point
too: both ratios are computed from the same numbers). If $g_\theta(x,t,s) = E[X_0 \mid X_t = x]$
for Gaussian data the map is exact only in the limit s -> t; in general $g_\theta$ absorbs the
curvature of the trajectory.

Time embedding: $c(\tau) = \tfrac14\log\rho_\tau$ with $\rho_\tau = b_\tau/a_\tau$ (the path's
noise level, so nets of different paths see the same features at equal noise), fed as
$[c, \sin(2^k c), \cos(2^k c)]_{k<K}$ for both t and s.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike

from ._checks import integer
from .paths import OU, AbstractPath, as_path

__all__ = ["ConsistencyNet", "boundary_coefficients"]


def boundary_coefficients(
    t: ArrayLike, s: ArrayLike, path: AbstractPath = OU
) -> tuple[Array, Array]:
    r"""Skip and output coefficients $(b_s/b_t,\; a_s - a_t b_s/b_t)$ on `path`.

    Exactly (1, 0) at s = t (the ratio of two equal numbers; at t = s = 0, where b = 0, the
    ratio is defined as 1). Only t = 0 is special-cased, so the derivatives in t and s are the
    formula's on the diagonal s = t too (selecting constants there would make them zero).
    """
    t, s = jnp.asarray(t), jnp.asarray(s)
    b_t = path.b(t)
    at_zero = b_t == 0
    ratio = jnp.where(at_zero, 1.0, path.b(s) / jnp.where(at_zero, 1.0, b_t))
    return ratio, jnp.where(at_zero, 0.0, path.a(s) - path.a(t) * ratio)


def _time_features(path: AbstractPath, tau: Array, n_freq: int) -> Array:
    c = 0.25 * path.log_rho(tau)
    freqs = 2.0 ** jnp.arange(n_freq, dtype=tau.dtype)
    return jnp.concatenate([c[None], jnp.sin(freqs * c), jnp.cos(freqs * c)])


class ConsistencyNet(eqx.Module):
    r"""$f_\theta(x, t, s)$ for $0 \le s \le t$, x of shape (..., dim), scalar t and s.

    **Arguments:** `dim` (data dimension), `width`, `depth` (hidden layers of the MLP $g_\theta$),
    `n_freq` (Fourier features per time), `key`, `dtype` (parameter dtype, default float32),
    `path` (the Gaussian path whose times t, s the net takes; default OU).
    """

    mlp: eqx.nn.MLP
    path: AbstractPath
    dim: int = eqx.field(static=True)
    n_freq: int = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        *,
        width: int = 128,
        depth: int = 3,
        n_freq: int = 4,
        key: Array,
        dtype=jnp.float32,
        path: AbstractPath = OU,
    ):
        self.path = as_path(path)
        dim, width = integer("dim", dim), integer("width", width)
        depth, n_freq = integer("depth", depth, ge=0), integer("n_freq", n_freq, ge=0)
        self.dim, self.n_freq = dim, n_freq
        self.mlp = eqx.nn.MLP(
            dim + 2 * (1 + 2 * n_freq),
            dim,
            width_size=width,
            depth=depth,
            activation=jax.nn.silu,
            key=key,
            dtype=dtype,
        )

    @property
    def dtype(self):
        return self.mlp.layers[0].weight.dtype

    def denoiser(self, x: Array, t: Array, s: Array) -> Array:
        """The raw network $g_\\theta(x, t, s)$ for a single x of shape (dim,)."""
        times = [_time_features(self.path, v, self.n_freq) for v in (t, s)]
        feats = jnp.concatenate([x, *times])
        return self.mlp(feats)

    def single(self, x: Array, t: Array, s: Array) -> Array:
        """f for one point x of shape (dim,) (t, s scalars, possibly per-sample under vmap)."""
        x, t, s = (jnp.asarray(v, self.dtype) for v in (x, t, s))
        skip, out = boundary_coefficients(t, s, self.path)
        return skip * x + out * self.denoiser(x, t, s)

    def __call__(self, x: ArrayLike, t: ArrayLike, s: ArrayLike) -> Array:
        self.path.check_times(t, s)  # 0 <= s <= t where the times are concrete (not under jit)
        x = jnp.asarray(x)
        if x.ndim == 0 or x.shape[-1] != self.dim:
            raise ValueError(f"`x` must have trailing dimension {self.dim}, got shape {x.shape}")
        flat = x.reshape(-1, self.dim)
        out = jax.vmap(self.single, in_axes=(0, None, None))(flat, t, s)
        return out.reshape(x.shape)
