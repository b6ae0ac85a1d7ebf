r"""Shortcut models (Frans, Hafner, Levine, Abbeel 2024), in the package's convention on any path.

A jump of length 2d is two jumps of length d: with the average velocity
$u(x, t, s) = (x - f(x, t, s))/(t - s)$,

$$u(x_t, t, t - 2d) = \tfrac12\big[u(x_t, t, t - d) + u(x', t - d, t - 2d)\big],\qquad
x' = x_t - d\,u(x_t, t, t - d),$$

the right side from the stop-gradient model. Jump lengths are dyadic, $2d \in \{\Delta,
2\Delta, 4\Delta, \dots\} \le T - \delta$ (level drawn uniformly), t uniform on
[delta + 2d, T]. The base case is flow matching, $d \to 0$: $u(x_t, t, t)$ against v (a
fraction `flow_fraction` of each batch, t uniform on [delta, T]); the smallest jump
$2d = \Delta$ is built from two such instantaneous velocities (two Euler half-steps). So
the fixed point, with the exact velocity, is the composition of Euler steps of length
$\Delta/2$ (`teacher_map(..., step=Delta/2, teacher="euler")`) on the dyadic jumps: a
discretization error of first order in $\Delta$, which `fixed_point` declares.
v from the pair (shortcut training) or the exact score (distillation).
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

__all__ = ["Shortcut"]


def flow_matching(model, key, ctx, velocity: str, n: int):
    r"""Per-example flow-matching loss $\|u_\theta(x_t, t, t) - v(x_t, t)\|^2$ on n examples,
    t uniform on [delta, T]: the diagonal (base) term of the objectives that need it."""
    k_pair, k_t = jax.random.split(key)
    x0, z = draw_pair(k_pair, ctx, n)
    t, _ = continuous_times(k_t, ctx, n, x0.dtype)
    x_t = noised(ctx.path, x0, z, t)
    v = velocity_of(velocity, ctx, x_t, t, x0, z)
    return squared_norm(jax.vmap(model.average_velocity)(x_t, t, t) - v)


def split(batch_size: int, fraction: float) -> tuple[int, int]:
    """(n_flow, n_rest): the static split of a batch into flow-matching and other examples
    (at least one of each when the batch has two)."""
    n_flow = min(max(round(batch_size * fraction), 1 if fraction else 0), batch_size - 1)
    return n_flow, batch_size - n_flow


class Shortcut(AbstractObjective):
    """The shortcut objective (module docstring). **Arguments:** `velocity` (``"pair"``,
    ``"exact"``), `flow_fraction` (share of flow-matching examples, in (0, 1); the paper's 0.75)."""

    velocity: str = eqx.field(static=True, default="pair")
    flow_fraction: float = eqx.field(static=True, default=0.75)
    has_step: ClassVar[bool] = True

    def __check_init__(self):
        one_of("velocity", self.velocity, VELOCITIES)
        number("flow_fraction", self.flow_fraction, gt=0, lt=1)

    def loss(self, model, target, key, ctx):
        k_flow, k_pair, k_level, k_t = jax.random.split(key, 4)
        n_flow, n = split(ctx.batch_size, self.flow_fraction)
        base = flow_matching(model, k_flow, ctx, self.velocity, n_flow)
        x0, z = draw_pair(k_pair, ctx, n)
        dtype = x0.dtype
        step = jnp.asarray(ctx.step, dtype)
        levels = jnp.floor(jnp.log2((ctx.T - ctx.delta) / step) + 1e-6) + 1  # 2d = step 2^k
        k = jnp.floor(jax.random.uniform(k_level, (n,), dtype) * levels)
        d = 0.5 * step * 2.0**k
        t = ctx.delta + 2 * d + (ctx.T - ctx.delta - 2 * d) * jax.random.uniform(k_t, (n,), dtype)
        x_t = noised(ctx.path, x0, z, t)
        inner = jnp.where(k > 0, d, 0.0)  # the smallest jump: instantaneous velocities

        def goal(x, t_, d_, inner_):
            u1 = target.average_velocity(x, t_, t_ - inner_)
            x_mid = x - d_ * u1
            u2 = target.average_velocity(x_mid, t_ - d_, t_ - d_ - inner_)
            return 0.5 * (u1 + u2)

        goal = jax.lax.stop_gradient(jax.vmap(goal)(x_t, t, d, inner))
        u = jax.vmap(model.average_velocity)(x_t, t, t - 2 * d)
        return jnp.concatenate([base, squared_norm(u - goal)])

    def fixed_point(self, step):
        return ("euler", step / 2)
