r"""Neural two-time maps $f_\theta(x, t, s)$ with the boundary condition $f(x, t, t) = x$ built in.

Both forms write $f_\theta = c_{skip}(t, s)\,x + c_{out}(t, s)\,N_\theta(x, t, s)$ with
$c_{skip}(t, t) = 1$, $c_{out}(t, t) = 0$, an MLP $N_\theta$, and on a Gaussian path
$x_t = a_t x_0 + b_t z$:

* **boundary form** (`ConsistencyNet`, the CTM/DDIM parameterisation): $N_\theta$ acts as a
  denoiser ($x_0$-prediction) and
  $$f_\theta(x, t, s) = \frac{b_s}{b_t}\,x + \Big(a_s - a_t\frac{b_s}{b_t}\Big) N_\theta(x, t, s),$$
  one DDIM step from t to s. If $N_\theta = E[X_0 \mid X_t = x]$ the map is exact only as
  s -> t; in general $N_\theta$ absorbs the curvature of the trajectory.
* **displacement form** (`DisplacementNet`, MeanFlow's and flow map matching's):
  $$f_\theta(x, t, s) = x + (s - t)\,u_\theta(x, t, s),$$
  with $u_\theta = N_\theta$ the average velocity over [s, t].

Both expose the average velocity $u = (x - f)/(t - s) = \alpha(t, s)\,x + \beta(t, s)\,N_\theta$
(`average_velocity`), with $\alpha = (1 - c_{skip})/(t - s)$ and $\beta = -c_{out}/(t - s)$: 0
and 1 for the displacement form; for the boundary form divided differences of a and b,
$\alpha = D_b/b_t$, $\beta = D_a - a_t D_b/b_t$ with $D_g = (g_t - g_s)/(t - s)$, evaluated
without cancellation near the diagonal (`secant`) and equal to the derivatives at s = t. So
$u(x, t, t) = \partial_s f(x, t, s)|_{s=t}$, the model's instantaneous velocity, and every
derivative in t and s is the formula's on the diagonal too (no select on t == s).

Time embedding: $c(\tau) = \tfrac14\log\rho_\tau$ with $\rho_\tau = b_\tau/a_\tau$ (the path's
noise level, so nets of different paths see the same features at equal noise), fed as
$[c, \sin(2^k c), \cos(2^k c)]_{k<K}$ for both t and s.
"""

from __future__ import annotations

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike

from ._checks import check_points, check_size, integer, one_of
from .flow import AbstractFlowMap
from .paths import OU, AbstractPath, as_path

__all__ = [
    "AbstractSkipNet",
    "ConsistencyNet",
    "DisplacementNet",
    "NETWORK_FORMS",
    "boundary_coefficients",
    "network",
    "secant",
]

# Gauss-Legendre nodes and weights on [0, 1] for the divided differences near the diagonal
_GL_X, _GL_W = np.polynomial.legendre.leggauss(8)
_GL_X, _GL_W = (_GL_X + 1) / 2, _GL_W / 2


def secant(fn, dfn, t: Array, s: Array) -> Array:
    r"""The divided difference $(g(t) - g(s))/(t - s)$ of g = `fn` (derivative `dfn`), and
    $g'(t)$ at s = t.

    Far from the diagonal (t - s > t/4) the difference quotient; closer, the mean of $g'$
    over [s, t] by 8-point Gauss-Legendre (no cancellation; exact on the diagonal, and to
    round-off for the smooth coefficients of the built-in paths on [3t/4, t]).
    """
    h = t - s
    far = h > 0.25 * t
    quotient = (fn(t) - fn(s)) / jnp.where(far, h, 1.0)
    nodes = s + h * jnp.asarray(_GL_X, h.dtype)
    mean = jnp.sum(jnp.asarray(_GL_W, h.dtype) * dfn(nodes))
    return jnp.where(far, quotient, mean)


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


class AbstractSkipNet(AbstractFlowMap):
    r"""$f_\theta = c_{skip}(t, s)\,x + c_{out}(t, s)\,N_\theta(x, t, s)$ with an MLP
    $N_\theta$ on x and the time features of t and s (the module docstring). Subclasses
    implement `coefficients(t, s)` and `velocity_coefficients(t, s)` (the $\alpha, \beta$ of
    $u = \alpha x + \beta N_\theta$)."""

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
        inputs = dim + 2 * (1 + 2 * n_freq)
        params = (inputs + 1) * width + max(depth - 1, 0) * (width + 1) * width + (width + 1) * dim
        # weights, gradients, two Adam moments, an EMA copy; in float64 at most
        check_size("width", 5 * 8 * params, f"a network of {params:,} parameters")
        self.dim, self.n_freq = dim, n_freq
        self.mlp = eqx.nn.MLP(
            inputs,
            dim,
            width_size=width,
            depth=depth,
            activation=jax.nn.silu,
            key=key,
            dtype=dtype,
        )

    @abc.abstractmethod
    def coefficients(self, t: Array, s: Array) -> tuple[Array, Array]:
        """(c_skip, c_out) at scalar times t, s, with (1, 0) at s = t."""

    @abc.abstractmethod
    def velocity_coefficients(self, t: Array, s: Array) -> tuple[Array, Array]:
        """(alpha, beta) with u = alpha x + beta N: ((1 - c_skip), -c_out) / (t - s) and
        their limits at s = t."""

    @property
    def dtype(self):
        return self.mlp.layers[0].weight.dtype

    def network(self, x: Array, t: Array, s: Array) -> Array:
        """The raw network $N_\\theta(x, t, s)$ for a single x of shape (dim,)."""
        times = [_time_features(self.path, v, self.n_freq) for v in (t, s)]
        return self.mlp(jnp.concatenate([x, *times]))

    def _cast(self, *values):
        return tuple(jnp.asarray(v, self.dtype) for v in values)

    def single(self, x: Array, t: Array, s: Array) -> Array:
        """f for one point x of shape (dim,) (t, s scalars, possibly per-sample under vmap)."""
        x, t, s = self._cast(x, t, s)
        skip, out = self.coefficients(t, s)
        return skip * x + out * self.network(x, t, s)

    def average_velocity(self, x: Array, t: Array, s: Array) -> Array:
        x, t, s = self._cast(x, t, s)
        alpha, beta = self.velocity_coefficients(t, s)
        return alpha * x + beta * self.network(x, t, s)

    def __call__(self, x: ArrayLike, t: ArrayLike, s: ArrayLike) -> Array:
        self.path.check_times(t, s)  # 0 <= s <= t where the times are concrete (not under jit)
        check_points("x", x, self.dim)  # shape; finite where concrete (not under jit)
        x = jnp.asarray(x)
        flat = x.reshape(-1, self.dim)
        out = jax.vmap(self.single, in_axes=(0, None, None))(flat, t, s)
        return out.reshape(x.shape)


class ConsistencyNet(AbstractSkipNet):
    r"""Boundary form $f_\theta(x, t, s)$ for $0 \le s \le t$ (the module docstring), x of
    shape (..., dim), scalar t and s.

    **Arguments:** `dim` (data dimension), `width`, `depth` (hidden layers of the MLP),
    `n_freq` (Fourier features per time), `key`, `dtype` (parameter dtype, default float32),
    `path` (the Gaussian path whose times t, s the net takes; default OU).
    """

    def denoiser(self, x: Array, t: Array, s: Array) -> Array:
        """The raw network (the $x_0$-prediction) for a single x of shape (dim,)."""
        return self.network(x, t, s)

    def coefficients(self, t, s):
        return boundary_coefficients(t, s, self.path)

    def velocity_coefficients(self, t, s):
        p = self.path
        b_t = p.b(t)
        at_zero = b_t == 0  # t = s = 0 on a path with b(0) = 0: no finite limit; 0 there
        b_t = jnp.where(at_zero, 1.0, b_t)
        d_a, d_b = secant(p.a, p.a_dot, t, s), secant(p.b, p.b_dot, t, s)
        alpha, beta = d_b / b_t, d_a - p.a(t) * d_b / b_t
        return jnp.where(at_zero, 0.0, alpha), jnp.where(at_zero, 0.0, beta)


class DisplacementNet(AbstractSkipNet):
    r"""Displacement form $f_\theta(x, t, s) = x + (s - t)\,u_\theta(x, t, s)$ (MeanFlow, flow
    map matching), same arguments as `ConsistencyNet`; `average_velocity` is $u_\theta$."""

    def coefficients(self, t, s):
        return jnp.ones_like(t), s - t

    def velocity_coefficients(self, t, s):
        return jnp.zeros_like(t), jnp.ones_like(t)


NETWORK_FORMS = {"boundary": ConsistencyNet, "displacement": DisplacementNet}


def network(form: str, dim: int, **kwargs) -> AbstractSkipNet:
    """The net of `form` (``"boundary"``: `ConsistencyNet`, ``"displacement"``:
    `DisplacementNet`) with the keyword arguments of either."""
    return NETWORK_FORMS[one_of("form", form, tuple(NETWORK_FORMS))](dim, **kwargs)
