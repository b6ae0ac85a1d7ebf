r"""Diffusion baselines with the exact score: same start N(0, I) at T, same target $p_\delta$.

Uniform grid $t_k = \delta + (K - k)(T - \delta)/K$, step $h = (T-\delta)/K$, exact score
$s(x, t) = \nabla\log p_t(x)$. Going backward in time from $t$ to $t - h$:

* reverse SDE, Euler-Maruyama: $x' = x + h\,(x + 2 s(x, t)) + \sqrt{2h}\,\xi$;
* reverse SDE, exponential integrator (linear part exact, score frozen over the step):
  $x' = e^{h} x + 2(e^{h} - 1)\, s(x, t) + \sqrt{e^{2h} - 1}\,\xi$;
* PF-ODE, Euler: $x' = x + h\,(x + s(x, t))$; Heun: trapezoidal corrector on the same velocity
  (two score evaluations per step, except the last one: no corrector at delta is skipped);
* PF-ODE, adaptive: diffrax Tsit5 with a PID controller (`mcm_prob.pf_flow`).

Each returns `SamplerOutput(samples, nfe)`, nfe counting score evaluations per sample.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from ._checks import data_family, finite_or_raise, integer, number, prng_key
from .data import DataDistribution, Gaussian
from .flow import ode_solve, pf_ode_step
from .sampling import SamplerOutput, _gaussian_law

__all__ = ["sample_sde", "sample_ode", "sample_ode_adaptive", "baseline_law", "BASELINES"]

_SDE = ("euler_maruyama", "exponential")
_ODE = ("euler", "heun")
BASELINES = tuple(f"sde_{m}" for m in _SDE) + tuple(f"ode_{m}" for m in _ODE) + ("ode_adaptive",)


def _check(data, n, T, delta, steps=None) -> None:
    data_family("data", data)
    integer("n", n)
    number("T", T, gt=number("delta", delta, gt=0))
    if steps is not None:
        integer("steps", steps)


def _grid(T, delta, steps):
    t = delta + (T - delta) * (steps - np.arange(steps + 1)) / steps
    t[-1] = delta
    return t


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
) -> SamplerOutput:
    """Reverse-time SDE from N(0, I) at T to delta with K = `steps` fixed steps (nfe = K)."""
    if method not in _SDE:
        raise ValueError(f"`method` must be one of {_SDE}, got {method!r}")
    _check(data, n, T, delta, steps)
    key = prng_key("key", key)
    t = _grid(T, delta, steps)
    dtype = jnp.result_type(float)
    k0, k1 = jax.random.split(key)
    x = jax.random.normal(k0, (n, data.dim), dtype)

    def body(x, inputs):
        k, t_k, h = inputs
        score = data.unchecked_score(x, t_k)
        xi = jax.random.normal(jax.random.fold_in(k1, k), x.shape, dtype)
        if method == "euler_maruyama":
            return x + h * (x + 2 * score) + jnp.sqrt(2 * h) * xi, None
        return jnp.exp(h) * x + 2 * jnp.expm1(h) * score + jnp.sqrt(jnp.expm1(2 * h)) * xi, None

    xs = (jnp.arange(steps), jnp.asarray(t[:-1], dtype), jnp.asarray(t[:-1] - t[1:], dtype))
    x, _ = jax.lax.scan(body, x, xs)
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
) -> SamplerOutput:
    """PF-ODE from N(0, I) at T to delta with K fixed Euler or Heun steps (nfe = K or 2K)."""
    if method not in _ODE:
        raise ValueError(f"`method` must be one of {_ODE}, got {method!r}")
    _check(data, n, T, delta, steps)
    key = prng_key("key", key)
    t = _grid(T, delta, steps)
    dtype = jnp.result_type(float)
    x = jax.random.normal(key, (n, data.dim), dtype)

    def body(x, inputs):
        return pf_ode_step(data, x, *inputs, method), None

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
) -> SamplerOutput:
    """Adaptive PF-ODE solve (Tsit5, PID controller, DDIM variables as in `mcm_prob.flow_map`).

    nfe is the mean over samples of 6 score evaluations per attempted step (Tsit5 is FSAL:
    7 stages, the first reused) plus the initial one, rounded up.
    """
    _check(data, n, T, delta)
    key = prng_key("key", key)
    number("rtol", rtol, gt=0), number("atol", atol, gt=0)
    x = jax.random.normal(key, (n, data.dim), jnp.result_type(float))
    t0, t1 = jnp.asarray(T, x.dtype), jnp.asarray(delta, x.dtype)
    y, num_steps = ode_solve(data, x, t0, t1, rtol, atol, max_steps)
    nfe = math.ceil(float(jnp.mean(6 * num_steps + 1)))
    return SamplerOutput(_finite(y, "sample_ode_adaptive"), nfe)


def baseline_law(data, method: str, *, T: float, delta: float, steps: int):
    r"""Exact law of a fixed-step baseline (`BASELINES` minus ``"ode_adaptive"``) on Gaussian data.

    With $s(x, t) = -\Sigma_t^{-1}(x - \alpha_t m)$ every step is affine plus Gaussian noise and
    diagonal in the eigenbasis of $\Sigma$: per direction with $\nu_t = \alpha_t^2\lambda +
    \sigma_t^2$, $z' = a z + c + \sqrt{q}\,\xi$. Euler-Maruyama: $a = 1 + h - 2h/\nu_t$, $q = 2h$;
    exponential: $a = e^h - 2(e^h - 1)/\nu_t$, $q = e^{2h} - 1$; ODE Euler: $a = 1 + h - h/\nu_t$;
    Heun: the trapezoidal composition of the affine velocities. The K steps are composed at
    once, $z_K = \sum_k (\prod_{j>k} a_j)(c_k + \sqrt{q_k}\,\xi_k) + (\prod_k a_k) z_0$ (cumulative
    products, no loop over steps). Returns a MultivariateNormal (numpy float64 arithmetic).
    """
    if not isinstance(data, Gaussian):
        raise TypeError(f"`data` must be a mcm_prob.data.Gaussian, got {type(data).__name__}")
    if method not in BASELINES[:-1]:
        raise ValueError(f"`method` must be one of {BASELINES[:-1]}, got {method!r}")
    _check(data, 1, T, delta, steps)
    lam, u = np.asarray(data.eigvals, np.float64), np.asarray(data.eigvecs, np.float64)
    m = u.T @ np.asarray(data.mean, np.float64)
    t = _grid(T, delta, steps)
    t_k, t_next = t[:-1, None], t[1:, None]  # (K, 1): every step's coefficients at once
    h = t_k - t_next

    def precision(tau):
        return 1.0 / (np.exp(-2 * tau) * lam - np.expm1(-2 * tau))

    prec = precision(t_k)
    shift = prec * np.exp(-t_k) * m  # score = -prec z + shift
    q = np.zeros_like(prec)
    if method == "sde_euler_maruyama":
        a, c, q = 1 + h - 2 * h * prec, 2 * h * shift, 2 * h + q
    elif method == "sde_exponential":
        a, c, q = np.exp(h) - 2 * np.expm1(h) * prec, 2 * np.expm1(h) * shift, np.expm1(2 * h) + q
    elif method == "ode_euler":
        a, c = 1 + h - h * prec, h * shift
    else:  # Heun: v(z, tau) = V z + w in eigencoordinates, V = prec - 1, w = -prec e^-tau m
        v1, w1 = prec - 1.0, -shift
        p2 = precision(t_next)
        v2, w2 = p2 - 1.0, -p2 * np.exp(-t_next) * m
        a = 1 - 0.5 * h * (v1 + v2 * (1 - h * v1))
        c = -0.5 * h * (w1 + w2 - h * v2 * w1)
    # z_K = sum_k (prod_{j > k} a_j) (c_k + sqrt(q_k) xi_k) + (prod_k a_k) z_0, z_0 ~ N(0, 1)
    after = np.concatenate([np.cumprod(a[::-1], 0)[::-1][1:], np.ones_like(a[:1])])
    mu = np.sum(after * c, 0)
    var = np.prod(a, 0) ** 2 + np.sum(after**2 * q, 0)
    return _gaussian_law(u @ mu, (u * var) @ u.T)
