r"""The exact probability-flow map $\Phi_{t\to s}$ (the ideal consistency function), on every path.

The PF-ODE of a Gaussian path is $\dot x = v(x, t) = (a'/a)x - b^2(\rho'/\rho)\nabla\log p_t(x)$
(OU: $-x - \nabla\log p_t(x)$). Its flow map $\Phi_{t\to s}$, $0 \le s \le t$, pushes $p_t$
forward to $p_s$; $f(x, t, s) = \Phi_{t\to s}(x)$.

* Gaussian data (any PSD covariance): closed form in the eigenbasis of $\Sigma$,
  $\Phi_{t\to s}(x) = a_s m + U \operatorname{diag}(\sqrt{\nu_s/\nu_t}) U^\top (x - a_t m)$
  with $\nu_t = a_t^2\lambda + b_t^2$.
* Other families: every path is OU after a change of scale and time (`mcm_prob.paths`):
  $\Phi^{path}_{t\to s}(x) = c_s\,\Phi^{OU}_{u_t\to u_s}(x/c_t)$ with $c = \sqrt{a^2 + b^2}$
  and $u$ the OU time of the same noise ratio, so one OU solve serves every path. The OU
  solve is one adaptive diffrax solve with the exact score; below t = 10 in the DDIM
  variables $y = x/\alpha_t$, $\rho = \sigma_t/\alpha_t$:
  $dy/d\rho = -\sigma_t \nabla\log p_t(\alpha_t y)$; above it, in x rescaled by a constant
  and t, where v decays like $\alpha_t$ (the DDIM form alone stalls beyond t of about 33: y is
  then ~1e14 and the answer a cancellation of such numbers). In the DDIM variables the
  trajectories of Dirac mixtures are exactly straight lines near the atoms, so small s (early
  stopping at delta = 1e-4, say) costs few steps. With the defaults (Tsit5, rtol = atol =
  1e-10; 1e-6 in float32) the solve agrees with the Gaussian closed form to about 1e-9
  (tested to <= 1e-8), and the semigroup and inverse properties hold to about 1e-8 (tested to
  <= 1e-6) on mixtures and boxes.
"""

from __future__ import annotations

import abc
import math

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike

from ._checks import check_points, check_time, integer, number, one_of
from .data import ClosedFormGaussian, DataDistribution
from .forward import alpha, sigma, snr_ratio, time_from_snr_ratio
from .paths import OU, AbstractPath, as_path

__all__ = [
    "flow_map",
    "pf_flow",
    "AbstractFlowMap",
    "ExactFlow",
    "pf_ode_velocity",
    "pf_ode_step",
    "velocity",
    "ode_solve",
    "path_ode_solve",
]

_METHODS = ("auto", "closed_form", "ode")


def _data_mean(data: DataDistribution, path: AbstractPath):
    """E[x_0], which the velocity needs only on a path with a(t_max) = 0 (else 0, unused)."""
    if not path.ends_in_noise:
        return 0.0
    try:
        return data.data_law().mean
    except NotImplementedError as err:
        raise ValueError(
            f"the PF-ODE velocity of the {path.name} path at its top time needs the data mean, "
            f"and {type(data).__name__}.data_law() has no `mean`"
        ) from err


def velocity(data: DataDistribution, x: Array, t, path: AbstractPath = OU) -> Array:
    r"""PF-ODE velocity with the exact score, unvalidated (t scalar or shape x.shape[:-1]):
    the building block of the teachers and the baselines (`pf_ode_velocity` checks)."""
    return path.velocity(x, t, data.unchecked_score(x, t, path), _data_mean(data, path))


def pf_ode_velocity(
    data: DataDistribution, x: ArrayLike, t: ArrayLike, *, path: AbstractPath = OU
) -> Array:
    r"""PF-ODE velocity $v(x, t) = (a'/a)x - b^2(\rho'/\rho)\nabla\log p_t(x)$ on `path`
    (OU: $-x - \nabla\log p_t(x)$); x of shape (..., dim)."""
    path = as_path(path)
    score = data.score(x, t, path)  # validates x and t; finite
    return _path_velocity(path, jnp.asarray(x), jnp.asarray(t), score, _data_mean(data, path))


@eqx.filter_jit
def _path_velocity(path: AbstractPath, x: Array, t: Array, score: Array, mean) -> Array:
    """`path.velocity` as one compiled program per shape (not one per operation)."""
    return path.velocity(x, t, score, mean)


def pf_ode_step(
    data: DataDistribution, x: Array, t, t_next, method: str = "heun", path: AbstractPath = OU
) -> Array:
    r"""One fixed PF-ODE step from t to t_next on `path` with the exact score (either direction).

    Euler: $x - h\,v(x, t)$ with $h = t - t_{next}$; Heun: the trapezoidal corrector
    $x - \tfrac h2 (v(x, t) + v(\tilde x, t_{next}))$ on the Euler predictor $\tilde x$.
    x: (..., dim); t, t_next: scalars or shape x.shape[:-1] (a time per point). Unvalidated: the
    building block of the CD teachers and the fixed-step ODE baselines.
    """
    if method not in ("euler", "heun"):
        raise ValueError(f"`method` must be 'euler' or 'heun', got {method!r}")
    t, t_next = jnp.asarray(t), jnp.asarray(t_next)
    h = (t - t_next)[..., None]
    v1 = velocity(data, x, t, path)
    x_euler = x - h * v1
    if method == "euler":
        return x_euler
    return x - 0.5 * h * (v1 + velocity(data, x_euler, t_next, path))


def _gaussian_flow(data: ClosedFormGaussian, x: Array, t, s, path: AbstractPath) -> Array:
    lam, vecs, m = data.eigvals, data.eigvecs, data.mean
    a_t, a_s = path.a(t), path.a(s)
    nu_t = a_t**2 * lam + path.b(t) ** 2
    nu_s = a_s**2 * lam + path.b(s) ** 2
    if vecs is None:  # standard basis
        return a_s * m + jnp.sqrt(nu_s / nu_t) * (x - a_t * m)
    coef = (x - a_t * m) @ vecs
    return a_s * m + (jnp.sqrt(nu_s / nu_t) * coef) @ vecs.T


# The solve runs in one time variable u and one state z. Below _SWITCH: the DDIM variables
# u = rho_t = sigma_t / alpha_t, z = x / alpha_t (Dirac-mixture trajectories are straight lines
# there). Above it, where the DDIM form alone stalls (beyond t of about 33, z ~ 1e14): u continues
# linearly in t with slope rho'(_SWITCH) and z = x / alpha(_SWITCH), so the field is the PF-ODE
# velocity (which decays like alpha_t) rescaled. Above _CAP, p_t = N(0, I) to working precision
# (see `flow_map`) and nothing moves. One diffeqsolve covers both pieces.
_SWITCH = 10.0
_CAP = 50.0
_RHO_SWITCH = math.sqrt(math.expm1(2 * _SWITCH))
_SLOPE = math.exp(2 * _SWITCH) / _RHO_SWITCH  # d rho / dt at _SWITCH


def _solver_time(t):
    """u(t): rho_t up to _SWITCH, then continued linearly in t."""
    return snr_ratio(jnp.minimum(t, _SWITCH)) + jnp.maximum(t - _SWITCH, 0.0) * _SLOPE


def _time(u):
    """t(u), the inverse of `_solver_time`."""
    low = time_from_snr_ratio(jnp.minimum(u, _RHO_SWITCH))
    return jnp.where(u <= _RHO_SWITCH, low, _SWITCH + (u - _RHO_SWITCH) / _SLOPE)


@eqx.filter_jit
def ode_solve(data: DataDistribution, x: Array, t, s, rtol, atol, max_steps: int):
    """The OU PF-ODE solve from OU time t to s (either order), unvalidated: one adaptive solve
    per point in the variables (u, z) above. Returns (Phi_{t->s}(x), number of steps per
    point). Other paths call it through `pf_flow`'s change of scale and time."""

    t_, s_ = jnp.minimum(t, _CAP), jnp.minimum(s, _CAP)
    down = t_ >= s_

    def vector_field(u, z, args):
        tau = _time(u)
        a = alpha(jnp.minimum(tau, _SWITCH))
        x = a * z
        score = data.unchecked_score(x, tau)
        ddim = -sigma(tau) * score  # dz/drho with z = x / alpha_tau
        upper = (-x - score) / (a * _SLOPE)  # dz/du with z = x / alpha(_SWITCH), du = SLOPE dt
        # at the switch itself, the side the solve is heading to (diffrax restarts there)
        below = jnp.where(down, tau <= _SWITCH, tau < _SWITCH)
        return jnp.where(below, ddim, upper)

    term = diffrax.ODETerm(vector_field)
    # the field jumps at the switch (z changes scale there): the solver steps onto it exactly
    controller = diffrax.ClipStepSizeController(
        diffrax.PIDController(rtol=rtol, atol=atol), jump_ts=[_RHO_SWITCH]
    )

    def solve_one(x1):
        sol = diffrax.diffeqsolve(
            term,
            diffrax.Tsit5(),
            t0=_solver_time(t_),
            t1=_solver_time(s_),
            dt0=None,
            y0=x1 / alpha(jnp.minimum(t_, _SWITCH)),
            stepsize_controller=controller,
            max_steps=max_steps,
        )
        return alpha(jnp.minimum(s_, _SWITCH)) * sol.ys[-1], sol.stats["num_steps"]

    flat = x.reshape(-1, x.shape[-1])
    out, num_steps = jax.vmap(solve_one)(flat)
    return jnp.where(t == s, x, out.reshape(x.shape)), num_steps.reshape(x.shape[:-1])


def _check_options(method, rtol, atol, max_steps) -> None:
    one_of("method", method, _METHODS)
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if tol is not None:
            number(name, tol, gt=0)
    integer("max_steps", max_steps)


def _tolerances(rtol, atol, dtype) -> tuple[float, float]:
    """The ODE tolerances for `dtype`: None means 1e-10 in float64 and 1e-6 in float32; a
    tolerance below 4 ulp of `dtype` cannot be met and is refused by name."""
    eps = float(jnp.finfo(dtype).eps)
    default = 1e-10 if eps < 1e-12 else 1e-6
    out = []
    for name, tol in (("rtol", rtol), ("atol", atol)):
        tol = default if tol is None else tol
        if tol < 4 * eps:
            raise ValueError(
                f"`{name}`={tol:g} is below what {jnp.dtype(dtype).name} can resolve (>= {4 * eps:.2g}); "
                "pass a larger tolerance or enable float64 with "
                'jax.config.update("jax_enable_x64", True)'
            )
        out.append(tol)
    return out[0], out[1]


def pf_flow(
    data: DataDistribution,
    x: ArrayLike,
    t0: ArrayLike,
    t1: ArrayLike,
    *,
    path: AbstractPath = OU,
    method: str = "auto",
    rtol: float | None = None,
    atol: float | None = None,
    max_steps: int = 4096,
) -> Array:
    r"""Transport x from time t0 to time t1 along the PF-ODE of `path`, in either direction.

    $\Phi_{t_0\to t_1}$ for any $t_0, t_1$ in the path's time range (> 0 for non-smooth data
    solved by ODE); `flow_map(data, x, t, s)` is the backward case t1 = s <= t0 = t. Same
    arguments and guarantees as `flow_map`.
    """
    path = as_path(path)
    _check_options(method, rtol, atol, max_steps)
    check_points("x", x, data.dim)
    if method == "closed_form" and not isinstance(data, ClosedFormGaussian):
        raise ValueError(
            "`method='closed_form'` needs Gaussian data (a mcm_prob.data.ClosedFormGaussian), "
            f"got {type(data).__name__}"
        )
    closed = isinstance(data, ClosedFormGaussian) and method != "ode"
    positive = data.regime == "nonsmooth" and not closed
    for name, value in (("t0", t0), ("t1", t1)):
        path.check_time(name, value)
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
        return _gaussian_flow(data, x, t0, t1, path)
    rtol, atol = _tolerances(rtol, atol, x.dtype)
    return path_ode_solve(data, x, t0, t1, path, rtol, atol, max_steps)[0]


def path_ode_solve(data, x: Array, t0, t1, path: AbstractPath, rtol, atol, max_steps: int):
    """`ode_solve` on any path through its change of scale and time,
    Phi^path_{t0->t1}(x) = c_{t1} Phi^OU_{u(t0)->u(t1)}(x / c_{t0}); unvalidated. Returns
    (the flowed x, number of solver steps per point)."""
    u0, u1 = path.ou_time(t0), path.ou_time(t1)
    y, num_steps = ode_solve(data, x / path.scale(t0), u0, u1, rtol, atol, max_steps)
    return path.scale(t1) * y, num_steps


def flow_map(
    data: DataDistribution,
    x: ArrayLike,
    t: ArrayLike,
    s: ArrayLike,
    *,
    path: AbstractPath = OU,
    method: str = "auto",
    rtol: float | None = None,
    atol: float | None = None,
    max_steps: int = 4096,
) -> Array:
    r"""Exact PF-ODE flow map $\Phi_{t\to s}(x)$ of `path` for $0 \le s \le t$.

    **Arguments:**
    - `data`: a data family from `mcm_prob.data`.
    - `x`: points of shape (..., dim), distributed (typically) as $p_t$.
    - `t`, `s`: scalar times with 0 <= s <= t in the path's time range; for non-smooth data
      solved by ODE, s > 0.
    - `path`: the Gaussian path (`mcm_prob.paths`; default OU).
    - `method`: ``"auto"`` (closed form for `Gaussian`, ODE otherwise), ``"closed_form"``
      (Gaussian only) or ``"ode"`` (diffrax Tsit5 with a PID controller for any family).
    - `rtol`, `atol`, `max_steps`: ODE tolerances and step budget (ignored by the closed form);
      tolerances default to 1e-10 for float64 `x` and 1e-6 for float32.

    **Large times.** Above OU time 50, $p_t = N(0, I)$ to working precision: the flow moves a
    point by at most $\alpha_{50}(|E[X_0 \mid x]| + |x|) \approx 2\cdot10^{-22}(R + |x|)$ from
    there on (data within radius R), so the ODE starts from min(u, 50); any finite t (and the
    top time of a path with a = 0 there, u = inf) is accepted.

    **Returns:** $\Phi_{t\to s}(x)$ with the shape of `x`. Jit-compatible (validation runs on
    concrete arguments only). The ODE path raises if the step budget is exhausted.
    """
    path = as_path(path)
    path.check_times(t, s)
    return pf_flow(
        data, x, t, s, path=path, method=method, rtol=rtol, atol=atol, max_steps=max_steps
    )


class AbstractFlowMap(eqx.Module):
    r"""A two-time map $f(x, t, s)$, $0 \le s \le t$, on a Gaussian path: the interface every
    model (learned nets, the exact flow, a user's map) offers the objectives.

    A subclass implements, for one point x of shape (dim,) and scalar t, s (jit-traceable,
    unvalidated, differentiable in x, t and s):

    - `single(x, t, s)`: $f(x, t, s)$, with $f(x, t, t) = x$;
    - `average_velocity(x, t, s)`: $u(x, t, s) = (x - f(x, t, s))/(t - s)$, so that
      $f = x + (s - t)\,u$ (the displacement form); on the diagonal its limit
      $u(x, t, t) = \partial_s f(x, t, s)|_{s=t}$, which is the PF-ODE velocity $v(x, t)$ for
      the exact flow;
    - `__call__(x, t, s)`: f batched over leading axes of x (validated),

    and has the fields `path` (whose time t and s are in) and `dim`.
    """

    @abc.abstractmethod
    def single(self, x: Array, t: Array, s: Array) -> Array:
        """f(x, t, s) for one point x of shape (dim,)."""

    @abc.abstractmethod
    def average_velocity(self, x: Array, t: Array, s: Array) -> Array:
        """u(x, t, s) = (x - f(x, t, s)) / (t - s), its limit at s = t; x of shape (dim,)."""

    @abc.abstractmethod
    def __call__(self, x: ArrayLike, t: ArrayLike, s: ArrayLike) -> Array:
        """f(x, t, s) for x of shape (..., dim), scalar t and s."""


def safe_quotient(num: Array, den: Array, on_zero: Array) -> Array:
    """num / den, and `on_zero` where den == 0, with finite derivatives everywhere (the
    denominator is replaced before the division, so no inf or NaN enters a gradient)."""
    zero = den == 0
    return jnp.where(zero, on_zero, num / jnp.where(zero, 1.0, den))


class ExactFlow(AbstractFlowMap):
    """The exact flow map of `path` as a consistency function `f(x, t, s)` (batched over leading
    axes of x). Usable wherever an f(x, t, s) is expected (samplers, metrics, teachers, and as
    a model in an objective's loss: its fixed point)."""

    data: DataDistribution
    path: AbstractPath
    method: str = eqx.field(static=True)
    rtol: float | None = eqx.field(static=True)
    atol: float | None = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)

    def __init__(
        self,
        data: DataDistribution,
        method: str = "auto",
        rtol: float | None = None,
        atol: float | None = None,
        max_steps: int = 4096,
        *,
        path: AbstractPath = OU,
    ):
        _check_options(method, rtol, atol, max_steps)  # at construction, by name
        self.data, self.method, self.path = data, method, as_path(path)
        self.rtol = None if rtol is None else float(rtol)
        self.atol = None if atol is None else float(atol)
        self.max_steps = int(max_steps)

    @property
    def dim(self) -> int:
        return self.data.dim

    def single(self, x: Array, t: Array, s: Array) -> Array:
        x = jnp.asarray(x)
        t, s = jnp.asarray(t, x.dtype), jnp.asarray(s, x.dtype)
        if isinstance(self.data, ClosedFormGaussian) and self.method != "ode":
            return _gaussian_flow(self.data, x, t, s, self.path)
        rtol, atol = _tolerances(self.rtol, self.atol, x.dtype)
        return path_ode_solve(self.data, x[None], t, s, self.path, rtol, atol, self.max_steps)[0][0]

    def average_velocity(self, x: Array, t: Array, s: Array) -> Array:
        x = jnp.asarray(x)
        t, s = jnp.asarray(t, x.dtype), jnp.asarray(s, x.dtype)
        # at s = t the flow is not evaluated at equal times (its derivative there is v)
        s_off = jnp.where(t == s, 0.5 * t, s)
        return safe_quotient(
            x - self.single(x, t, s_off), t - s, velocity(self.data, x, t, self.path)
        )

    def __call__(self, x: ArrayLike, t: ArrayLike, s: ArrayLike) -> Array:
        return flow_map(
            self.data,
            x,
            t,
            s,
            path=self.path,
            method=self.method,
            rtol=self.rtol,
            atol=self.atol,
            max_steps=self.max_steps,
        )
