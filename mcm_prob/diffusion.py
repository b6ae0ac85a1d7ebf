r"""Diffusion baselines with the exact score, in the path's own time: same start, same target $p_\delta$.

Uniform grid in the path's time $t_k = \delta + (K - k)(T - \delta)/K$, step $h = (T-\delta)/K$,
exact score $s(x, t) = \nabla\log p_t(x)$, start from the path's prior at T (``start="prior"``)
or from the exact $p_T$ (``"exact"``). With the path's forward SDE $dX = f X dt + g\,dB$,
$f = a'/a$, $g^2 = 2b^2\rho'/\rho$ (OU: f = -1, g^2 = 2), going backward from $t$ to $t - h$:

* reverse SDE, Euler-Maruyama: $x' = x - h\,(f x - g^2 s(x, t)) + \sqrt{h g^2}\,\xi$;
* reverse SDE, exponential integrator (linear part exact, score frozen over the step):
  $x' = (a_{t-h}/a_t)\,x + a_{t-h}\big(\int_{t-h}^{t} a\,d\rho^2\big)\, s(x, t) +
  a_{t-h}\sqrt{\rho_t^2 - \rho_{t-h}^2}\,\xi$ (OU: $e^h x + 2(e^h - 1)s + \sqrt{e^{2h} - 1}\,\xi$);
* PF-ODE, Euler: $x' = x - h\,v(x, t)$; Heun: trapezoidal corrector on the same velocity on
  every step (two score evaluations per step);
* PF-ODE, adaptive: diffrax Tsit5 with a PID controller (`mcm_prob.pf_flow`).

The reverse SDE is singular where $a_T = 0$ (the linear interpolant at 1, TrigFlow at pi/2):
the SDE baselines refuse such a T; the ODE baselines start there. Each returns
`SamplerOutput(samples, nfe)`, nfe counting score evaluations per sample.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from ._checks import finite_or_raise, integer, number, one_of, prng_key
from .data import DataDistribution, Gaussian, check_data
from .flow import path_ode_solve, pf_ode_step
from .laws import EigenNormal, compose_affine, gaussian_parts, on_time_grid
from .paths import OU, AbstractPath, as_path
from .sampling import SamplerOutput

__all__ = ["sample_sde", "sample_ode", "sample_ode_adaptive", "baseline_law", "BASELINES"]

_SDE = ("euler_maruyama", "exponential")
_ODE = ("euler", "heun")
BASELINES = tuple(f"sde_{m}" for m in _SDE) + tuple(f"ode_{m}" for m in _ODE) + ("ode_adaptive",)
_STARTS = ("prior", "exact")


def _check(data, n, T, delta, path, start, steps=None, sde=False) -> AbstractPath:
    check_data("data", data)
    integer("n", n)
    number("T", T, gt=number("delta", delta, gt=0))
    path = as_path(path)
    path.check_time("T", T)
    one_of("start", start, _STARTS)
    if steps is not None:
        integer("steps", steps)
    if sde and float(path.a(T)) == 0.0:
        raise ValueError(
            f"the reverse SDE of the {path.name} path is singular at T = {T:g} (a(T) = 0); "
            "use T < t_max or an ODE baseline"
        )
    return path


def _grid(T, delta, steps):
    t = delta + (T - delta) * (steps - np.arange(steps + 1)) / steps
    t[-1] = delta
    return t


def _start(data, path, start, key, n: int, T) -> Array:
    dtype = jnp.result_type(float)
    if start == "exact":
        return jnp.asarray(data.marginal(T, path).sample(key, (n,)), dtype)
    return jnp.asarray(path.prior_std(T), dtype) * jax.random.normal(key, (n, data.dim), dtype)


def _finite(x: Array, what: str) -> Array:
    return finite_or_raise(x, f"{what} produced non-finite values; use more steps")


def sample_sde(
    data: DataDistribution,
    key: Array,
    n: int,
    *,
    T: float,
    delta: float,
    steps: int,
    method: str = "exponential",
    path: AbstractPath = OU,
    start: str = "prior",
) -> SamplerOutput:
    """Reverse-time SDE of `path` from its prior (or p_T) at T to delta with K = `steps` fixed
    steps (nfe = K)."""
    one_of("method", method, _SDE)
    path = _check(data, n, T, delta, path, start, steps, sde=True)
    key = prng_key("key", key)
    t = _grid(T, delta, steps)
    dtype = jnp.result_type(float)
    k0, k1 = jax.random.split(key)
    x = _start(data, path, start, k0, n, T)
    t_k, t_next = jnp.asarray(t[:-1], dtype), jnp.asarray(t[1:], dtype)
    if method == "euler_maruyama":
        f, g2 = path.sde_coefficients(t_k)
        h = t_k - t_next
        coefs = (1 - h * f, h * g2, jnp.sqrt(h * g2))
    else:
        coefs = path.exponential_step(t_k, t_next)

    def body(x, inputs):
        k, tk, lin, c, sd = inputs
        score = data.unchecked_score(x, tk, path)
        xi = jax.random.normal(jax.random.fold_in(k1, k), x.shape, dtype)
        return lin * x + c * score + sd * xi, None

    x, _ = jax.lax.scan(body, x, (jnp.arange(steps), t_k, *coefs))
    return SamplerOutput(_finite(x, f"sample_sde({method!r})"), int(steps))


def sample_ode(
    data: DataDistribution,
    key: Array,
    n: int,
    *,
    T: float,
    delta: float,
    steps: int,
    method: str = "heun",
    path: AbstractPath = OU,
    start: str = "prior",
) -> SamplerOutput:
    """PF-ODE of `path` from its prior (or p_T) at T to delta with K fixed Euler or Heun steps
    (nfe = K or 2K)."""
    one_of("method", method, _ODE)
    path = _check(data, n, T, delta, path, start, steps)
    key = prng_key("key", key)
    t = _grid(T, delta, steps)
    dtype = jnp.result_type(float)
    x = _start(data, path, start, key, n, T)

    def body(x, inputs):
        return pf_ode_step(data, x, *inputs, method, path), None

    x, _ = jax.lax.scan(body, x, (jnp.asarray(t[:-1], dtype), jnp.asarray(t[1:], dtype)))
    nfe = steps if method == "euler" else 2 * steps
    return SamplerOutput(_finite(x, f"sample_ode({method!r})"), int(nfe))


def sample_ode_adaptive(
    data: DataDistribution,
    key: Array,
    n: int,
    *,
    T: float,
    delta: float,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 16384,
    path: AbstractPath = OU,
    start: str = "prior",
) -> SamplerOutput:
    """Adaptive PF-ODE solve (Tsit5, PID controller, DDIM variables as in `mcm_prob.flow_map`,
    through the path's change of scale and time to OU).

    nfe is the mean over samples of 6 score evaluations per attempted step (Tsit5 is FSAL:
    7 stages, the first reused) plus the initial one, rounded up.
    """
    path = _check(data, n, T, delta, path, start)
    key = prng_key("key", key)
    number("rtol", rtol, gt=0), number("atol", atol, gt=0)
    x = _start(data, path, start, key, n, T)
    t0, t1 = jnp.asarray(T, x.dtype), jnp.asarray(delta, x.dtype)
    y, num_steps = path_ode_solve(data, x, t0, t1, path, rtol, atol, max_steps)
    nfe = math.ceil(float(jnp.mean(6 * num_steps + 1)))
    return SamplerOutput(_finite(y, "sample_ode_adaptive"), nfe)


def baseline_law(
    data: Gaussian,
    method: str,
    *,
    T: float,
    delta: float,
    steps: int,
    path: AbstractPath = OU,
    start: str = "prior",
) -> EigenNormal:
    r"""Exact law of a fixed-step baseline (`BASELINES` minus ``"ode_adaptive"``) on Gaussian data.

    With $s(x, t) = -\Sigma_t^{-1}(x - a_t m)$ every step is affine plus Gaussian noise and
    diagonal in the eigenbasis of $\Sigma$: per direction, with precision $P = 1/\nu_t$,
    $\nu_t = a_t^2\lambda + b_t^2$, the step is $z' = A z + c + \sqrt{q}\,\xi$ with
    Euler-Maruyama $A = 1 - h f - h g^2 P$, $c = h g^2 P a_t m$, $q = h g^2$; exponential
    $A = \mathrm{lin} - \mathrm{coef}\,P$, $c = \mathrm{coef}\,P a_t m$, $q = \mathrm{std}^2$; the
    ODE velocity is $v = Vz + w$ with $V = (a' a\lambda + b b')P$, $w = (a' b^2 - b b' a_t) P m$
    (finite where a = 0), Euler $A = 1 - hV$, $c = -hw$, and Heun the trapezoidal composition.
    The K steps are composed at once (`mcm_prob.laws.compose_affine`): O(K d), no d x d
    matrix. **Returns:** an `EigenNormal` (a `MultivariateNormal`), numpy float64 arithmetic.
    """
    one_of("method", method, BASELINES[:-1])
    path = _check(data, 1, T, delta, path, start, steps, sde=method.startswith("sde"))
    m, lam, u = gaussian_parts(data)
    t = _grid(T, delta, steps)
    t_k, t_next = t[:-1, None], t[1:, None]  # (K, 1): every step's coefficients at once
    h = t_k - t_next

    def parts(tau):
        a, b = on_time_grid(lambda t: (path.a(t), path.b(t)), tau)
        return a, b, 1.0 / (a**2 * lam + b**2)

    a1, b1, p1 = parts(t_k)
    q = np.zeros_like(p1)
    if method == "sde_euler_maruyama":
        f, g2 = on_time_grid(path.sde_coefficients, t_k)
        big_a, c, q = 1 - h * f - h * g2 * p1, h * g2 * p1 * a1 * m, h * g2 + q
    elif method == "sde_exponential":
        lin, coef, std = on_time_grid(path.exponential_step, t_k, t_next)
        big_a, c, q = lin - coef * p1, coef * p1 * a1 * m, std**2 + q
    else:

        def affine_velocity(tau, a, b, p):
            da, db = on_time_grid(lambda t: (path.a_dot(t), path.b_dot(t)), tau)
            return (da * a * lam + b * db) * p, (da * b**2 - b * db * a) * p * m

        v1, w1 = affine_velocity(t_k, a1, b1, p1)
        if method == "ode_euler":
            big_a, c = 1 - h * v1, -h * w1
        else:
            v2, w2 = affine_velocity(t_next, *parts(t_next))
            big_a = 1 - 0.5 * h * (v1 + v2 * (1 - h * v1))
            c = -0.5 * h * (w1 + w2 - h * v2 * w1)
    if start == "prior":
        mean0, var0 = np.zeros_like(m), np.full_like(lam, float(path.prior_std(T)) ** 2)
    else:
        a_T, b_T = float(path.a(T)), float(path.b(T))
        mean0, var0 = a_T * m, a_T**2 * lam + b_T**2
    mu, var = compose_affine(big_a, c, q, mean0, var0)
    return EigenNormal(mu, var, u)
