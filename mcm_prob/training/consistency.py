r"""Consistency distillation and training with an explicit discretization step $\Delta$.

**Time grid.** $t_n = \delta + n\Delta$, $n = 0, \dots, N$, $N = \lfloor (T - \delta)/\Delta \rfloor$
(so $\Delta$ is exact and $t_N \le T$). Each training example draws an index $n \in \{1..N\}$,
sets $t = t_n$, $t - \Delta = t_{n-1}$, and a target time $s = t_m$ with $m$ uniform in
$\{0..n-1\}$ ($m = n-1$ gives $s = t - \Delta$, where the target is the boundary value itself).
Every time is in the units of the path, and $x_t = a_t x_0 + b_t z$ on it.

**Losses.** With $x_0 \sim p_0$, $z \sim N(0, I)$:

* consistency distillation (`CD`): $\hat x_{t-\Delta} = \Psi_\Delta(x_t, t)$, one teacher step
  of the path's PF-ODE with the exact score: Euler $\hat x = x_t - \Delta v(x_t, t)$; Heun
  (trapezoidal corrector); or the exact flow $\Phi_{t\to t-\Delta}$ (``"exact"``: isolates
  learning error from solver error);
* consistency training (`CT`): $\hat x_{t-\Delta} = a_{t-\Delta}x_0 + b_{t-\Delta}z$ with the
  same $(x_0, z)$ (unbiased only as $\Delta \to 0$);

$$\ell = d\big(f_\theta(x_t, t, s),\; \mathrm{sg}[f_{\theta^-}(\hat x_{t-\Delta}, t-\Delta, s)]\big),$$

with $d$ the squared L2 distance or pseudo-Huber $\sqrt{\|u\|^2 + c^2} - c$ (iCT:
$c = 0.00054\sqrt{d}$). The fixed point of CD is the composition of teacher steps along the
grid (`teacher_map`), so the learned map inherits the teacher's discretization error; with the
exact teacher only learning error remains. CT's is the exact flow as $\Delta \to 0$.

**Time sampling.** ``"uniform"`` over n, or ``"lognormal"``: t drawn from a lognormal
($\log t \sim N(\mu, s^2)$) truncated to $(\delta, t_N]$ and rounded up to the grid, i.e.
$P(n) \propto \Phi(\frac{\log t_n - \mu}{s}) - \Phi(\frac{\log t_{n-1} - \mu}{s})$ (iCT).
"""

from __future__ import annotations

import math
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.scipy.special import ndtr, ndtri

from .._checks import number, one_of
from ..data import DataDistribution
from ..flow import flow_map, pf_ode_step
from ..paths import AbstractPath, as_path
from .objective import AbstractObjective, Context

__all__ = ["CD", "CT", "grid_batch", "grid_indices", "teacher_map", "TEACHERS", "DISTANCES"]

TEACHERS = ("euler", "heun", "exact")
DISTANCES = ("l2", "pseudo_huber")
TIME_SAMPLINGS = ("uniform", "lognormal")


def distance(diff: jax.Array, kind: str, huber_c: float | None) -> jax.Array:
    """Per-example squared L2 or pseudo-Huber distance of `diff` (..., d)."""
    sq = jnp.sum(diff**2, -1)
    if kind == "l2":
        return sq
    c = huber_c if huber_c is not None else 0.00054 * math.sqrt(diff.shape[-1])
    return jnp.sqrt(sq + c**2) - c


def _teacher_step(data, path, teacher: str, rtol, atol, x, t, t_prev):
    """One backward PF-ODE step from t to t_prev, per sample (x: (B, d), t: (B,))."""
    if teacher == "exact":
        one = lambda xi, ti, tpi: flow_map(data, xi, ti, tpi, path=path, rtol=rtol, atol=atol)  # noqa: E731
        return jax.vmap(one)(x, t, t_prev)
    return pf_ode_step(data, x, t, t_prev, teacher, path)


@eqx.filter_jit
def _teacher_chain(data, path, teacher: str, rtol, atol, x, t, step, n):
    """n teacher steps from t (n traced: one compilation for every (t, s, step))."""

    def body(k, x):
        tk = jnp.full(x.shape[:1], t - k * step, x.dtype)
        return _teacher_step(data, path, teacher, rtol, atol, x, tk, tk - step)

    return jax.lax.fori_loop(0, n, body, x)


def teacher_map(
    data: DataDistribution,
    x,
    t: float,
    s: float,
    *,
    step: float,
    teacher: str = "euler",
    rtol: float = 1e-6,
    atol: float = 1e-6,
    path: AbstractPath | None = None,
):
    r"""The teacher's own map from t down to s on `path` (default OU): n = (t - s)/Delta
    composed teacher steps.

    This is the fixed point that CD with this teacher converges to on the grid, so
    $E\|\Psi^{(n)}_\Delta(x) - \Phi_{t\to s}(x)\|^2$ is the discretization part of a learned
    model's error (no learning involved). x: (n_points, dim); (t - s)/step must be an integer.
    """
    one_of("teacher", teacher, TEACHERS)
    step = number("step", step, gt=0)
    path = as_path(path)
    path.check_times(t, s)
    n = round((t - s) / step)
    if abs(n * step - (t - s)) > 1e-9 * max(1.0, t):
        raise ValueError(f"(t - s) / step must be an integer, got ({t} - {s}) / {step}")
    x = jnp.asarray(x)
    return _teacher_chain(
        data,
        path,
        teacher,
        rtol,
        atol,
        x,
        jnp.asarray(t, x.dtype),
        jnp.asarray(step, x.dtype),
        jnp.asarray(n, jnp.int32),
    )


def grid_indices(key, step, n_max, shape, *, delta, sampling="uniform", loc=-0.5, scale=1.2):
    """Grid indices n in {1..N} (N = n_max, possibly traced) of shape `shape`: uniform, or
    lognormal in the path's time rounded up to the grid (the module docstring).
    Jit-traceable, unvalidated."""
    if sampling == "uniform":
        n = jnp.floor(jax.random.uniform(key, shape) * n_max) + 1
    else:
        t_top = delta + n_max * step
        lo = ndtr((jnp.log(jnp.maximum(delta, 1e-30)) - loc) / scale)
        hi = ndtr((jnp.log(t_top) - loc) / scale)
        u = lo + (hi - lo) * jax.random.uniform(key, shape)
        t = jnp.exp(loc + scale * ndtri(u))
        n = jnp.ceil((t - delta) / step - 1e-6)
    return jnp.clip(n, 1, n_max)


def grid_batch(
    key,
    ctx: Context,
    *,
    teacher: str | None,
    sampling: str = "uniform",
    loc: float = -0.5,
    scale: float = 1.2,
    rtol: float = 1e-6,
    atol: float = 1e-6,
):
    """One batch (x_t, t, x_hat_{t-Delta}, t - Delta, s) on the Delta = `ctx.step` grid, in the
    data's dtype: x_hat from one step of `teacher` (CD) or, with ``teacher=None``, from the same
    (x_0, z) (CT). Jit-traceable, unvalidated: the building block of `CD` and `CT`, public for
    user objectives on the same grid."""
    k_x0, k_z, k_n, k_m = jax.random.split(key, 4)
    b = ctx.batch_size
    x0 = ctx.x0(k_x0, b)
    dtype = x0.dtype
    step = jnp.asarray(ctx.step, dtype)
    n_max = jnp.floor((ctx.T - ctx.delta) / step + 1e-9)
    n = grid_indices(
        k_n, step, n_max, (b,), delta=ctx.delta, sampling=sampling, loc=loc, scale=scale
    ).astype(dtype)
    m = jnp.floor(jax.random.uniform(k_m, (b,), dtype) * n)
    t, t_prev, s = ctx.delta + n * step, ctx.delta + (n - 1) * step, ctx.delta + m * step
    z = jax.random.normal(k_z, x0.shape, dtype)
    path = ctx.path
    x_t = path.a(t)[:, None] * x0 + path.b(t)[:, None] * z
    if teacher is None:
        x_prev = path.a(t_prev)[:, None] * x0 + path.b(t_prev)[:, None] * z
    else:
        x_prev = _teacher_step(ctx.data, path, teacher, rtol, atol, x_t, t, t_prev)
    return x_t, t, x_prev, t_prev, s


def _grid_loss(obj, model, target, key, ctx, teacher):
    x_t, t, x_prev, t_prev, s = grid_batch(
        key,
        ctx,
        teacher=teacher,
        sampling=obj.time_sampling,
        loc=obj.lognormal_loc,
        scale=obj.lognormal_scale,
        **({} if teacher is None else {"rtol": obj.rtol, "atol": obj.atol}),
    )
    pred = jax.vmap(model.single)(x_t, t, s)
    tgt = jax.vmap(target.single)(x_prev, t_prev, s)
    return distance(pred - tgt, obj.distance, obj.huber_c)


def _check_grid_options(obj) -> None:
    one_of("distance", obj.distance, DISTANCES)
    one_of("time_sampling", obj.time_sampling, TIME_SAMPLINGS)
    if obj.huber_c is not None:
        number("huber_c", obj.huber_c, gt=0)
    number("lognormal_loc", obj.lognormal_loc)
    number("lognormal_scale", obj.lognormal_scale, gt=0)


class CD(AbstractObjective):
    """Consistency distillation with a one-step teacher of the exact PF-ODE (module docstring).

    **Arguments:** `teacher` (``"euler"``, the default of `TrainConfig` and the estimation
    study too, ``"heun"``, ``"exact"``), `distance` (``"l2"``,
    ``"pseudo_huber"`` with `huber_c`, None = iCT's), `time_sampling` (``"uniform"``,
    ``"lognormal"`` with `lognormal_loc`, `lognormal_scale`), `rtol`, `atol` (the exact
    teacher's ODE tolerances for non-Gaussian data).
    """

    teacher: str = eqx.field(static=True, default="euler")
    distance: str = eqx.field(static=True, default="l2")
    huber_c: float | None = eqx.field(static=True, default=None)
    time_sampling: str = eqx.field(static=True, default="uniform")
    lognormal_loc: float = eqx.field(static=True, default=-0.5)
    lognormal_scale: float = eqx.field(static=True, default=1.2)
    rtol: float = eqx.field(static=True, default=1e-6)
    atol: float = eqx.field(static=True, default=1e-6)
    has_step: ClassVar[bool] = True

    def __check_init__(self):
        one_of("teacher", self.teacher, TEACHERS)
        _check_grid_options(self)
        number("rtol", self.rtol, gt=0)
        number("atol", self.atol, gt=0)

    def loss(self, model, target, key, ctx):
        return _grid_loss(self, model, target, key, ctx, self.teacher)

    def fixed_point(self, step):
        return (self.teacher, step)


class CT(AbstractObjective):
    """Consistency training (the target from the same (x_0, z) one grid step lower; iCT with
    ``distance="pseudo_huber"``, ``time_sampling="lognormal"``); arguments as `CD`'s."""

    distance: str = eqx.field(static=True, default="l2")
    huber_c: float | None = eqx.field(static=True, default=None)
    time_sampling: str = eqx.field(static=True, default="uniform")
    lognormal_loc: float = eqx.field(static=True, default=-0.5)
    lognormal_scale: float = eqx.field(static=True, default=1.2)
    has_step: ClassVar[bool] = True

    def __check_init__(self):
        _check_grid_options(self)

    def loss(self, model, target, key, ctx):
        return _grid_loss(self, model, target, key, ctx, None)

    def fixed_point(self, step):
        return None
