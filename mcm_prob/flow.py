r"""The exact probability-flow map $\Phi_{t\to s}$ (the ideal consistency function).

The PF-ODE of the OU process is $\dot x = v(x, t) = -x - \nabla\log p_t(x)$. Its flow map
$\Phi_{t\to s}$, $0 \le s \le t$, pushes $p_t$ forward to $p_s$; $f(x, t, s) = \Phi_{t\to s}(x)$.

* Gaussian data (any PSD covariance): closed form in the eigenbasis of $\Sigma$,
  $\Phi_{t\to s}(x) = \alpha_s m + U \operatorname{diag}(\sqrt{\nu_s/\nu_t}) U^\top (x - \alpha_t m)$
  with $\nu_t = \alpha_t^2\lambda + \sigma_t^2$.
* Other families: an adaptive diffrax solve with the exact score, written in the DDIM variables
  $y = x/\alpha_t$, $\rho = \sigma_t/\alpha_t$:
  $dy/d\rho = -\sigma_t \nabla\log p_t(\alpha_t y)$.
  In these variables the trajectories of Dirac mixtures are exactly straight lines near the atoms,
  so small s (early stopping at delta = 1e-4, say) costs few steps. With the defaults
  (Tsit5, rtol = atol = 1e-10) the solve agrees with the Gaussian closed form to about 1e-9
  (tested to <= 1e-8), and the semigroup and inverse properties hold to about 1e-8 (tested to
  <= 1e-6) on mixtures and boxes.
"""

from __future__ import annotations

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike

from ._checks import check_points, check_time, check_times, integer, number, one_of
from .data import DataDistribution, Gaussian
from .forward import alpha, sigma, snr_ratio, time_from_snr_ratio

__all__ = ["flow_map", "pf_flow", "ExactFlow", "pf_ode_velocity", "pf_ode_step"]

_METHODS = ("auto", "closed_form", "ode")


def pf_ode_velocity(data: DataDistribution, x: ArrayLike, t: ArrayLike) -> Array:
    r"""PF-ODE velocity $v(x, t) = -x - \nabla\log p_t(x)$; x of shape (..., dim)."""
    return -jnp.asarray(x) - data.score(x, t)


def pf_ode_step(data: DataDistribution, x: Array, t, t_next, method: str = "heun") -> Array:
    r"""One fixed PF-ODE step from t to t_next with the exact score (either direction).

    Euler: $x - h\,v(x, t)$ with $h = t - t_{next}$; Heun: the trapezoidal corrector
    $x - \tfrac h2 (v(x, t) + v(\tilde x, t_{next}))$ on the Euler predictor $\tilde x$.
    x: (..., dim); t, t_next: scalars or shape x.shape[:-1] (a time per point). Unvalidated: the
    building block of the CD teachers and the fixed-step ODE baselines.
    """
    if method not in ("euler", "heun"):
        raise ValueError(f"`method` must be 'euler' or 'heun', got {method!r}")
    t, t_next = jnp.asarray(t), jnp.asarray(t_next)
    h = (t - t_next)[..., None]
    v1 = -x - data.unchecked_score(x, t)
    x_euler = x - h * v1
    if method == "euler":
        return x_euler
    return x - 0.5 * h * (v1 - x_euler - data.unchecked_score(x_euler, t_next))


def _gaussian_flow(data: Gaussian, x: Array, t, s) -> Array:
    lam, vecs, m = data.eigvals, data.eigvecs, data.mean
    nu_t = alpha(t) ** 2 * lam + sigma(t) ** 2
    nu_s = alpha(s) ** 2 * lam + sigma(s) ** 2
    coef = (x - alpha(t) * m) @ vecs
    return alpha(s) * m + (jnp.sqrt(nu_s / nu_t) * coef) @ vecs.T


@eqx.filter_jit
def _ode_solve(data: DataDistribution, x: Array, t, s, rtol, atol, max_steps: int):
    """PF-ODE solve from t to s (either order) in the DDIM variables, one adaptive solve per
    point. Returns (Phi_{t->s}(x), number of steps per point)."""

    def vector_field(rho, y, args):
        tau = time_from_snr_ratio(rho)
        return -sigma(tau) * data.unchecked_score(alpha(tau) * y, tau)

    term = diffrax.ODETerm(vector_field)
    controller = diffrax.PIDController(rtol=rtol, atol=atol)

    def solve_one(x1):
        sol = diffrax.diffeqsolve(
            term,
            diffrax.Tsit5(),
            t0=snr_ratio(t),
            t1=snr_ratio(s),
            dt0=None,
            y0=x1 / alpha(t),
            stepsize_controller=controller,
            max_steps=max_steps,
        )
        return alpha(s) * sol.ys[-1], sol.stats["num_steps"]

    flat = x.reshape(-1, x.shape[-1])
    out, num_steps = jax.vmap(solve_one)(flat)
    return jnp.where(t == s, x, out.reshape(x.shape)), num_steps.reshape(x.shape[:-1])


def _check_options(method, rtol, atol, max_steps) -> None:
    one_of("method", method, _METHODS)
    number("rtol", rtol, gt=0), number("atol", atol, gt=0)
    integer("max_steps", max_steps)


def pf_flow(
    data: DataDistribution,
    x: ArrayLike,
    t0: ArrayLike,
    t1: ArrayLike,
    *,
    method: str = "auto",
    rtol: float = 1e-10,
    atol: float = 1e-10,
    max_steps: int = 4096,
) -> Array:
    r"""Transport x from time t0 to time t1 along the PF-ODE, in either direction.

    $\Phi_{t_0\to t_1}$ for any $t_0, t_1 \ge 0$ (> 0 for non-smooth data solved by ODE);
    `flow_map(data, x, t, s)` is the backward case t1 = s <= t0 = t. Same arguments and
    guarantees as `flow_map`.
    """
    _check_options(method, rtol, atol, max_steps)
    check_points("x", x, data.dim)
    if method == "closed_form" and not isinstance(data, Gaussian):
        raise ValueError(f"`method='closed_form'` needs Gaussian data, got {type(data).__name__}")
    closed = isinstance(data, Gaussian) and method != "ode"
    positive = data.regime == "nonsmooth" and not closed
    for name, value in (("t0", t0), ("t1", t1)):
        try:
            check_time(name, value, positive=positive)
        except ValueError as err:
            if not positive:
                raise
            raise ValueError(
                f"{type(data).__name__} is non-smooth: the flow to or from time 0 is singular; "
                f"need `{name}` > 0 (early stopping at some delta > 0)"
            ) from err
    x = jnp.asarray(x)
    t0, t1 = jnp.asarray(t0, x.dtype), jnp.asarray(t1, x.dtype)
    if closed:
        return _gaussian_flow(data, x, t0, t1)
    return _ode_solve(data, x, t0, t1, rtol, atol, max_steps)[0]


def flow_map(
    data: DataDistribution,
    x: ArrayLike,
    t: ArrayLike,
    s: ArrayLike,
    *,
    method: str = "auto",
    rtol: float = 1e-10,
    atol: float = 1e-10,
    max_steps: int = 4096,
) -> Array:
    r"""Exact PF-ODE flow map $\Phi_{t\to s}(x)$ for $0 \le s \le t$.

    **Arguments:**
    - `data`: a data family from `mcm_prob.data`.
    - `x`: points of shape (..., dim), distributed (typically) as $p_t$.
    - `t`, `s`: scalar times with 0 <= s <= t; for non-smooth data solved by ODE, s > 0.
    - `method`: ``"auto"`` (closed form for `Gaussian`, ODE otherwise), ``"closed_form"``
      (Gaussian only) or ``"ode"`` (diffrax Tsit5 with a PID controller for any family).
    - `rtol`, `atol`, `max_steps`: ODE tolerances and step budget (ignored by the closed form).

    **Returns:** $\Phi_{t\to s}(x)$ with the shape of `x`. Jit-compatible (validation runs on
    concrete arguments only). The ODE path raises if the step budget is exhausted.
    """
    check_times(t, s)
    return pf_flow(data, x, t, s, method=method, rtol=rtol, atol=atol, max_steps=max_steps)


class ExactFlow(eqx.Module):
    """The exact flow map as a consistency function `f(x, t, s)` (batched over leading axes of x).

    Usable wherever an f(x, t, s) is expected (samplers, consistency-error metrics, teachers).
    """

    data: DataDistribution
    method: str = eqx.field(static=True, default="auto")
    rtol: float = eqx.field(static=True, default=1e-10)
    atol: float = eqx.field(static=True, default=1e-10)
    max_steps: int = eqx.field(static=True, default=4096)

    def __call__(self, x: ArrayLike, t: ArrayLike, s: ArrayLike) -> Array:
        return flow_map(
            self.data,
            x,
            t,
            s,
            method=self.method,
            rtol=self.rtol,
            atol=self.atol,
            max_steps=self.max_steps,
        )
