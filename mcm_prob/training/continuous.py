r"""Continuous-time consistency (sCM, Lu & Song 2024), for two-time maps on any path.

The Eulerian condition: along the PF-ODE the map to a fixed s is constant,
$\frac{d}{dt} f(x_t, t, s) = \partial_t f + \partial_x f\, v(x_t, t) = 0$, with
$f(x, s, s) = x$; its solution is the exact flow. sCM's loss is the $\Delta \to 0$ limit of CD:

$$\ell = \frac{e^{w_\phi(t)}}{d}\,\big\|f_\theta(x_t, t, s) - \mathrm{sg}[f_{\theta^-}(x_t, t, s) - \hat g]\big\|^2 - w_\phi(t),
\qquad \hat g = \frac{g}{\|g\| + c},\quad g = \frac{d}{dt} f_{\theta^-}(x_t, t, s),$$

whose gradient at $\theta = \theta^-$ is that of $\langle f_\theta, \mathrm{sg}[\hat g]\rangle$:
the tangent $g$ by one `jax.jvp` along $(v, 1)$ in $(x, t)$, normalised (`tangent_c`, sCM's
c = 0.1), and warmed up: for a skip net $f = c_{skip} x + c_{out} N_\theta$,
$g = \dot c_{skip} x + c_{skip} v + \dot c_{out} N + r\,c_{out} \dot N$ with r rising linearly
from 0 to 1 over `warmup` iterations (sCM's tangent warm-up; other models use the full
tangent). $w_\phi(t)$ is sCM's adaptive weighting, a linear function of the Fourier time
features of t trained with the network (`adaptive=False`: $w = 0$, plain sum of squares).
v from the exact score (sCD) or the pair (sCT). Fixed point: the exact flow ($g = 0$ there).
Times: t uniform on [delta, T], s uniform on [delta, t].
"""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp

from .._checks import integer, number, one_of
from ..networks import AbstractSkipNet
from .objective import (
    VELOCITIES,
    AbstractObjective,
    continuous_times,
    draw_pair,
    noised,
    squared_norm,
    velocity_of,
)

__all__ = ["ContinuousConsistency", "TimeWeight", "time_derivative"]


class TimeWeight(eqx.Module):
    r"""$w(t) = \theta^\top [c, \sin 2^k c, \cos 2^k c]_{k<K}$, $c = \tfrac14\log\rho_t$: a
    learned log-weight per noise level (zero at initialisation)."""

    weights: jax.Array
    n_freq: int = eqx.field(static=True)

    def __init__(self, n_freq: int = 4):
        self.n_freq = integer("n_freq", n_freq, ge=0)
        self.weights = jnp.zeros(2 + 2 * self.n_freq)

    def __call__(self, path, t):
        c = 0.25 * path.log_rho(t)
        k = 2.0 ** jnp.arange(self.n_freq, dtype=c.dtype)
        feats = [jnp.ones_like(c), c, *jnp.sin(k * c[..., None]).T, *jnp.cos(k * c[..., None]).T]
        return jnp.stack(feats, -1) @ self.weights.astype(c.dtype)


def time_derivative(model, x, t, s, v, r=1.0):
    r"""$(f, \frac{d}{dt} f)$ at one point along the tangent (v, 1) in (x, t), s fixed; for a
    skip net the network's own derivative is scaled by r (the warm-up)."""
    if not isinstance(model, AbstractSkipNet):
        return jax.jvp(lambda x_, t_: model.single(x_, t_, s), (x, t), (v, jnp.ones_like(t)))
    x, t, s, v = (jnp.asarray(a, model.dtype) for a in (x, t, s, v))
    one = jnp.ones_like(t)
    (skip, out), (d_skip, d_out) = jax.jvp(lambda t_: model.coefficients(t_, s), (t,), (one,))
    net, d_net = jax.jvp(lambda x_, t_: model.network(x_, t_, s), (x, t), (v, one))
    f = skip * x + out * net
    return f, d_skip * x + skip * v + d_out * net + r * out * d_net


class ContinuousConsistency(AbstractObjective):
    """sCM's continuous-time consistency objective (module docstring).

    **Arguments:** `velocity` (``"exact"``: sCD, ``"pair"``: sCT), `tangent_c` (normalisation
    constant, > 0), `warmup` (tangent warm-up iterations, 0 = none), `adaptive` (learned
    weighting), `n_freq` (its time features).
    """

    weight: TimeWeight | None
    velocity: str = eqx.field(static=True)
    tangent_c: float = eqx.field(static=True)
    warmup: int = eqx.field(static=True)
    has_step: ClassVar[bool] = False

    def __init__(
        self,
        velocity: str = "pair",
        *,
        tangent_c: float = 0.1,
        warmup: int = 0,
        adaptive: bool = True,
        n_freq: int = 4,
    ):
        self.velocity = one_of("velocity", velocity, VELOCITIES)
        self.tangent_c = number("tangent_c", tangent_c, gt=0)
        self.warmup = integer("warmup", warmup, ge=0)
        if not isinstance(adaptive, bool):
            raise ValueError(f"`adaptive` must be True or False, got {adaptive!r}")
        self.weight = TimeWeight(n_freq) if adaptive else None

    def loss(self, model, target, key, ctx):
        k_pair, k_t = jax.random.split(key)
        x0, z = draw_pair(k_pair, ctx)
        t, s = continuous_times(k_t, ctx, x0.shape[0], x0.dtype)
        x_t = noised(ctx.path, x0, z, t)
        v = velocity_of(self.velocity, ctx, x_t, t, x0, z)
        r = 1.0 if self.warmup == 0 else jnp.minimum(1.0, ctx.iteration / self.warmup)
        f_minus, g = jax.vmap(lambda *a: time_derivative(target, *a, r))(x_t, t, s, v)
        g = g / (jnp.sqrt(squared_norm(g))[:, None] + self.tangent_c)
        pred = jax.vmap(model.single)(x_t, t, s)
        sq = squared_norm(pred - jax.lax.stop_gradient(f_minus - g))
        if self.weight is None:
            return sq
        w = self.weight(ctx.path, t).astype(sq.dtype)
        return jnp.exp(w) * sq / x0.shape[-1] - w

    def fixed_point(self, step):
        return None
