r"""The objective interface: what every way of learning $f(x, t, s) = \Phi_{t\to s}(x)$ supplies.

An objective is an immutable `equinox.Module` with

* `loss(model, target, key, ctx)`: the per-example loss, shape (batch,), of `model` (an
  `mcm_prob.flow.AbstractFlowMap`, differentiated) against `target` (the same network with the
  stop-gradient online weights, or their EMA: the loop decides, the objective never
  differentiates through it), on a batch the objective draws from `ctx` (data, path, time
  range, step, iteration);
* `has_step` (class variable): whether it has a discretization step $\Delta$ (the grid axis
  `fit_grid` vmaps over; continuous-time objectives have none and run at $\Delta = 0$);
* `fixed_point(step)`: what it converges to, ``None`` for the exact flow, or
  ``(teacher, teacher_step)`` for the composed map of a one-step teacher
  (`mcm_prob.training.teacher_map`), e.g. CD with the Euler teacher.

The loop (`mcm_prob.fit`, `mcm_prob.fit_grid`) owns everything else: network, optimiser,
EMA, divergence handling, sharding. Inexact arrays inside an objective (sCM's adaptive
weighting) are trained with the network. Conventions: data at t = 0, $x_t = a_t x_0 + b_t z$,
$s \le t$ in [delta, T]; the PF-ODE velocity $v(x, t)$ comes from the exact score
(``velocity="exact"``, distillation) or from the pair, $v = a'_t x_0 + b'_t z$
(``velocity="pair"``, training: $E[v \mid x_t]$ is the PF-ODE velocity).
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array

from ..flow import velocity as exact_velocity
from ..paths import AbstractPath

__all__ = [
    "AbstractObjective",
    "Context",
    "VELOCITIES",
    "pair_velocity",
    "continuous_times",
    "velocity_of",
    "squared_norm",
    "draw_pair",
    "noised",
]

VELOCITIES = ("exact", "pair")


class Context(NamedTuple):
    """What an objective's loss sees besides the models: `data` (the data family), `path`,
    the training range [`delta`, `T`], `step` (Delta, traced; 0 for continuous objectives),
    `iteration` (traced int), `batch_size`, and `pool` (the fixed training set (n, dim), or
    None for fresh draws)."""

    data: Any
    path: AbstractPath
    T: float
    delta: float
    step: Array
    iteration: Array
    batch_size: int
    pool: Array | None = None

    def x0(self, key: Array, n: int | None = None) -> Array:
        """n (default `batch_size`) draws of x_0: fresh, or uniform with replacement from `pool`."""
        n = self.batch_size if n is None else n
        if self.pool is None:
            return self.data.sample(key, n)
        return self.pool[jax.random.randint(key, (n,), 0, self.pool.shape[0])]


class AbstractObjective(eqx.Module):
    """The public base of objectives (module docstring): subclass it for your own."""

    has_step: ClassVar[bool]  # set by every subclass

    @abc.abstractmethod
    def loss(self, model, target, key: Array, ctx: Context) -> Array:
        """Per-example losses, shape (ctx.batch_size,) (or any length: the loop averages)."""

    @abc.abstractmethod
    def fixed_point(self, step: float) -> tuple[str, float] | None:
        """None (the exact flow) or (teacher, teacher_step) of the composed teacher map."""


def squared_norm(v: Array) -> Array:
    """Per-example squared norm over the last axis."""
    return jnp.sum(v**2, -1)


def pair_velocity(path: AbstractPath, x0: Array, z: Array, t: Array) -> Array:
    r"""Conditional velocity $a'_t x_0 + b'_t z$ (batch of x0, z (B, d), t (B,))."""
    return path.a_dot(t)[:, None] * x0 + path.b_dot(t)[:, None] * z


def velocity_of(kind: str, ctx: Context, x_t: Array, t: Array, x0: Array, z: Array) -> Array:
    """The PF-ODE velocity at (x_t, t): from the exact score or from the pair (x0, z)."""
    if kind == "exact":
        return exact_velocity(ctx.data, x_t, t, ctx.path)
    return pair_velocity(ctx.path, x0, z, t)


def continuous_times(key: Array, ctx: Context, n: int, dtype) -> tuple[Array, Array]:
    """t uniform on [delta, T] and s uniform on [delta, t], n of each: the continuous limit of
    the CD/CT grid sampling (n uniform in 1..N, s uniform below it), shared by every
    continuous-time objective so that all see the same (t, s) law."""
    k_t, k_s = jax.random.split(key)
    t = ctx.delta + (ctx.T - ctx.delta) * jax.random.uniform(k_t, (n,), dtype)
    s = ctx.delta + (t - ctx.delta) * jax.random.uniform(k_s, (n,), dtype)
    return t, s


def draw_pair(key: Array, ctx: Context, n: int | None = None) -> tuple[Array, Array]:
    """(x0, z): n draws of x_0 (`Context.x0`) and as many standard normal z."""
    k_x0, k_z = jax.random.split(key)
    x0 = ctx.x0(k_x0, n)
    return x0, jax.random.normal(k_z, x0.shape, x0.dtype)


def noised(path: AbstractPath, x0: Array, z: Array, t: Array) -> Array:
    """x_t = a_t x0 + b_t z for a batch (t of shape (B,))."""
    return path.a(t)[:, None] * x0 + path.b(t)[:, None] * z
