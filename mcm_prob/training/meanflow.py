r"""MeanFlow (Geng, Deng, Bai, Kolter, He 2025), in the package's convention on any path.

The average velocity $u(x, t, s) = (x - \Phi_{t\to s}(x))/(t - s)$ of the exact flow
satisfies the MeanFlow identity (differentiate $(t - s)\,u(x_t, t, s) = x_t - x_s$ in t along
the PF-ODE):

$$u(x_t, t, s) = v(x_t, t) - (t - s)\,\frac{d}{dt} u(x_t, t, s),\qquad
\frac{d}{dt} u = \partial_t u + \partial_x u\; v .$$

Loss: $\ell = \mathrm{sg}(w)\,\|\Delta\|^2$ with
$\Delta = u_\theta(x_t, t, s) - \mathrm{sg}[v - (t - s)\,\tfrac{d}{dt}u_{\theta^-}]$, the total
derivative by one `jax.jvp` along the tangent (v, 1, 0) in (x, t, s), and MeanFlow's
adaptive weight $w = 1/(\|\Delta\|^2 + c)^p$ (`weight_p`, `weight_c`; p = 0 switches it off).
A fraction `diagonal` of the examples has s = t, where the loss is flow matching
($u_\theta(x_t, t, t)$ against v); the others t uniform on [delta, T], s uniform on [delta, t].
v from the pair (MeanFlow's training) or the exact score (distillation). The model's
`average_velocity` is used as it is: $u_\theta$ itself for the displacement form; for the
boundary form the divided difference of its coefficients (`mcm_prob.networks`). Fixed point:
the exact flow ($\Delta = 0$ there with the exact velocity).
"""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp

from .._checks import number, one_of
from .objective import (
    VELOCITIES,
    AbstractObjective,
    continuous_times,
    draw_pair,
    noised,
    squared_norm,
    velocity_of,
)

__all__ = ["MeanFlow", "adaptive_weight"]


def adaptive_weight(sq, p: float, c: float):
    """MeanFlow's stop-gradient weight 1 / (sq + c)^p of a per-example squared error."""
    return jax.lax.stop_gradient(1.0 / (sq + c) ** p) if p else jnp.ones_like(sq)


class MeanFlow(AbstractObjective):
    """MeanFlow's objective (module docstring).

    **Arguments:** `velocity` (``"pair"``: training, ``"exact"``: distillation), `diagonal`
    (fraction of examples with s = t, in [0, 1); MeanFlow's best: 0.75), `weight_p`,
    `weight_c` (adaptive weight; MeanFlow's p = 1, c = 1e-3).
    """

    velocity: str = eqx.field(static=True, default="pair")
    diagonal: float = eqx.field(static=True, default=0.75)
    weight_p: float = eqx.field(static=True, default=1.0)
    weight_c: float = eqx.field(static=True, default=1e-3)
    has_step: ClassVar[bool] = False

    def __check_init__(self):
        one_of("velocity", self.velocity, VELOCITIES)
        number("diagonal", self.diagonal, ge=0, lt=1)
        number("weight_p", self.weight_p, ge=0)
        number("weight_c", self.weight_c, gt=0)

    def loss(self, model, target, key, ctx):
        k_pair, k_t, k_d = jax.random.split(key, 3)
        x0, z = draw_pair(k_pair, ctx)
        n = x0.shape[0]
        t, s = continuous_times(k_t, ctx, n, x0.dtype)
        s = jnp.where(jax.random.uniform(k_d, (n,)) < self.diagonal, t, s)
        x_t = noised(ctx.path, x0, z, t)
        v = velocity_of(self.velocity, ctx, x_t, t, x0, z)

        def total_derivative(x, t_, s_, v_):
            tangent = (v_, jnp.ones_like(t_), jnp.zeros_like(s_))
            return jax.jvp(target.average_velocity, (x, t_, s_), tangent)[1]

        du_dt = jax.vmap(total_derivative)(x_t, t, s, v)
        goal = jax.lax.stop_gradient(v - (t - s)[:, None] * du_dt)
        u = jax.vmap(model.average_velocity)(x_t, t, s)
        sq = squared_norm(u - goal)
        return adaptive_weight(sq, self.weight_p, self.weight_c) * sq

    def fixed_point(self, step):
        return None
