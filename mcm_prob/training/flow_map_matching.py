r"""Flow map matching and self-distillation (Boffi, Albergo, Vanden-Eijnden 2025) on any path.

The exact flow $f(x, t, s) = \Phi_{t\to s}(x)$ is characterised, with $f(x, t, t) = x$, by

* **Lagrangian**: $\partial_s f(x, t, s) = v(f(x, t, s), s)$ (the trajectory solves the ODE);
  $\ell = \|\partial_s f_\theta(x_t, t, s) - v(f_\theta(x_t, t, s), s)\|^2$;
* **Eulerian**: $\partial_t f(x, t, s) + \partial_x f(x, t, s)\, v(x, t) = 0$ (constant along
  the flow, the sCM condition as a squared residual); $\ell = \|\frac{d}{dt} f_\theta\|^2$;
* **progressive**: $f(x, t, s) = f(f(x, t, m), m, s)$ for $s \le m \le t$ (the semigroup), m
  uniform on [s, t]; $\ell = \|f_\theta(x_t, t, s) - \mathrm{sg}[f_{\theta^-}(f_{\theta^-}(x_t, t, m), m, s)]\|^2$,

derivatives by `jax.jvp`, differentiated through (no stop-gradient) for the Lagrangian and
Eulerian residuals, as in the paper. The velocity field v:

* ``velocity="exact"`` (distillation): the exact PF-ODE velocity from the exact score, at
  any point (the Lagrangian residual needs it at $f_\theta(x_t, t, s)$);
* ``velocity="pair"`` (self-distillation): the model's own instantaneous velocity
  $\mathrm{sg}[u_{\theta^-}(x, \tau, \tau)]$, learned by flow matching against
  $a'_t x_0 + b'_t z$ on a fraction `flow_fraction` of each batch.

The progressive loss fixes nothing on the diagonal by itself (any flow is a semigroup), so it
always carries the flow-matching term, with the pair or the exact velocity as its target.
Fixed point: the exact flow. Times: t uniform on [delta, T], s uniform on [delta, t].
"""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp

from .._checks import number, one_of
from ..flow import velocity as exact_velocity
from .objective import (
    VELOCITIES,
    AbstractObjective,
    continuous_times,
    draw_pair,
    noised,
    squared_norm,
)
from .shortcut import flow_matching, split

__all__ = ["FlowMapMatching", "FLOW_MAP_KINDS"]

FLOW_MAP_KINDS = ("lagrangian", "eulerian", "progressive")


class FlowMapMatching(AbstractObjective):
    """Flow map matching (module docstring). **Arguments:** `kind` (``"lagrangian"``,
    ``"eulerian"``, ``"progressive"``), `velocity` (``"exact"``: distillation, ``"pair"``:
    self-distillation), `flow_fraction` (share of flow-matching examples when they are used,
    in (0, 1))."""

    kind: str = eqx.field(static=True, default="lagrangian")
    velocity: str = eqx.field(static=True, default="exact")
    flow_fraction: float = eqx.field(static=True, default=0.5)
    has_step: ClassVar[bool] = False

    def __check_init__(self):
        one_of("kind", self.kind, FLOW_MAP_KINDS)
        one_of("velocity", self.velocity, VELOCITIES)
        number("flow_fraction", self.flow_fraction, gt=0, lt=1)

    @property
    def uses_flow_matching(self) -> bool:
        """Whether a flow-matching term anchors the diagonal (self-distillation, progressive)."""
        return self.velocity == "pair" or self.kind == "progressive"

    def _field(self, ctx, target):
        """v(x, tau) for one point: exact, or the model's own (stop-gradient) velocity."""
        if self.velocity == "exact":
            return lambda x, tau: exact_velocity(ctx.data, x[None], tau, ctx.path)[0]
        return lambda x, tau: jax.lax.stop_gradient(target.average_velocity(x, tau, tau))

    def loss(self, model, target, key, ctx):
        k_flow, k_pair, k_t, k_m = jax.random.split(key, 4)
        n_flow, n = (0, ctx.batch_size)
        if self.uses_flow_matching:
            n_flow, n = split(ctx.batch_size, self.flow_fraction)
        x0, z = draw_pair(k_pair, ctx, n)
        t, s = continuous_times(k_t, ctx, n, x0.dtype)
        x_t = noised(ctx.path, x0, z, t)
        field = self._field(ctx, target)
        if self.kind == "lagrangian":

            def residual(x, t_, s_):
                f, df_ds = jax.jvp(lambda r: model.single(x, t_, r), (s_,), (jnp.ones_like(s_),))
                return df_ds - field(f, s_)

            out = squared_norm(jax.vmap(residual)(x_t, t, s))
        elif self.kind == "eulerian":

            def residual(x, t_, s_):
                tangent = (field(x, t_).astype(x.dtype), jnp.ones_like(t_))
                return jax.jvp(lambda y, r: model.single(y, r, s_), (x, t_), tangent)[1]

            out = squared_norm(jax.vmap(residual)(x_t, t, s))
        else:
            m = s + (t - s) * jax.random.uniform(k_m, t.shape, t.dtype)

            def composed(x, t_, m_, s_):
                return target.single(target.single(x, t_, m_), m_, s_)

            goal = jax.lax.stop_gradient(jax.vmap(composed)(x_t, t, m, s))
            out = squared_norm(jax.vmap(model.single)(x_t, t, s) - goal)
        if not n_flow:
            return out
        base = flow_matching(model, k_flow, ctx, self.velocity, n_flow)
        return jnp.concatenate([base, out])

    def fixed_point(self, step):
        return None
