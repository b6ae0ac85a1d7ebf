r"""The public base of Gaussian paths $x_t = a(t)\,x_0 + b(t)\,z$ (data at t = 0).

Every such path is the Ornstein-Uhlenbeck process after a change of scale and time: with
$c(t) = \sqrt{a_t^2 + b_t^2}$ and the OU time $u(t) = \tfrac12\log(1 + \rho_t^2)$ of the same
noise ratio $\rho_t = b_t/a_t$,

$$x^{path}_t = c(t)\, X^{OU}_{u(t)}, \qquad X^{OU}_u = e^{-u} x_0 + \sqrt{1 - e^{-2u}}\, z,$$

so every exact quantity of a path follows from the OU one (docs/conventions.md):
$p_t(x) = c_t^{-d} p^{OU}_{u_t}(x/c_t)$, $\nabla\log p_t(x) = \nabla\log p^{OU}_{u_t}(x/c_t)/c_t$
and $\Phi_{t\to s}(x) = c_s\,\Phi^{OU}_{u_t\to u_s}(x/c_t)$. At a point where $a_t = 0$ (the
linear interpolant at t = 1, TrigFlow at $\pi/2$) $u_t = \infty$ and $x_t = b_t z$ exactly.

Transition from s to t >= s: $x_t \mid x_s \sim N\big((a_t/a_s) x_s, (b_t^2 - (a_t/a_s)^2
b_s^2) I\big)$. PF-ODE: $\dot x = (a'/a)\,x - b^2(\rho'/\rho)\,\nabla\log p_t(x)$.
"""

from __future__ import annotations

import abc
import math
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jaxtyping import Array, ArrayLike

from .._checks import check_time, concrete, prng_key

__all__ = ["AbstractPath"]


def _elementwise_derivative(fn, t: ArrayLike) -> Array:
    """d fn / dt for an elementwise function of t (any shape), by forward-mode autodiff."""
    t = jnp.asarray(t, jnp.result_type(float))
    return jax.jvp(fn, (t,), (jnp.ones_like(t),))[1]


class AbstractPath(eqx.Module):
    r"""A Gaussian path $x_t = a(t) x_0 + b(t) z$, $t \in [0, t_{max}]$: subclass it for your own.

    A subclass implements `a(t)` and `b(t)` (elementwise over any shape of t, jit-traceable;
    $a(0) = 1$, $b(0) = 0$, $\rho = b/a$ strictly increasing) and sets `t_max` (a field or a
    ``ClassVar``; may be `math.inf`) and the class variable `name`. Everything else has a
    generic implementation that built-in paths override with closed forms: derivatives by
    autodiff, `time_of_rho` by bisection, the transition by the noise ratio.

    Attributes every path has: `name` (its spec name), `t_max`, `units` (what its time means,
    for result files).
    """

    t_max: eqx.AbstractVar[float]
    name: ClassVar[str] = "custom"

    @abc.abstractmethod
    def a(self, t: ArrayLike) -> Array:
        """The data coefficient a(t) (elementwise)."""

    @abc.abstractmethod
    def b(self, t: ArrayLike) -> Array:
        """The noise coefficient b(t) (elementwise)."""

    # -- derived coefficients ---------------------------------------------------------------
    @property
    def ends_in_noise(self) -> bool:
        """Whether a(t_max) = 0: x_t = b z exactly at the top time (the linear interpolant,
        TrigFlow), where the data term and rho = b/a need care."""
        if not math.isfinite(self.t_max):
            return False
        with jax.ensure_compile_time_eval():  # the path's constants, also inside a trace
            return float(self.a(self.t_max)) == 0.0

    @property
    def units(self) -> str:
        """What the time of this path means (stored as the `units` of time coordinates)."""
        return f"{self.name} path time"

    def a_dot(self, t: ArrayLike) -> Array:
        """a'(t), by forward-mode autodiff."""
        return _elementwise_derivative(self.a, t)

    def b_dot(self, t: ArrayLike) -> Array:
        """b'(t), by forward-mode autodiff."""
        return _elementwise_derivative(self.b, t)

    def rho(self, t: ArrayLike) -> Array:
        r"""The noise ratio $\rho_t = b_t / a_t$ (the EDM noise level of $x_t / a_t$); inf where a = 0."""
        return self.b(t) / self.a(t)

    def log_rho(self, t: ArrayLike) -> Array:
        r"""$\log\rho_t$, finite for every t in the range (the network's time feature): both
        coefficients are floored at the dtype's tiny number (t = 0 gives about log tiny, a = 0
        about -log tiny)."""
        a, b = self.a(t), self.b(t)
        tiny = jnp.finfo(jnp.result_type(a, b)).tiny
        return jnp.log(jnp.maximum(b, tiny)) - jnp.log(jnp.maximum(a, tiny))

    def time_of_rho(self, rho: ArrayLike) -> Array:
        r"""The time t with $\rho_t$ = `rho` (elementwise): bisection on [0, t_max] (to the
        dtype's resolution); built-in paths override it with the closed form."""
        rho = jnp.asarray(rho, jnp.result_type(float))
        hi = self.t_max if math.isfinite(self.t_max) else 1.0
        hi = jnp.full_like(rho, hi)
        if not math.isfinite(self.t_max):  # grow the bracket until rho(hi) >= rho

            def grow(h):
                return jnp.where(self.rho(h) < rho, 2.0 * h, h)

            hi = jax.lax.fori_loop(0, 64, lambda _, h: grow(h), hi)
        lo = jnp.zeros_like(rho)

        def halve(_, bounds):
            lo, hi = bounds
            mid = 0.5 * (lo + hi)
            below = self.rho(mid) < rho
            return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

        lo, hi = jax.lax.fori_loop(0, 80, halve, (lo, hi))
        return 0.5 * (lo + hi)

    def scale(self, t: ArrayLike) -> Array:
        r"""$c_t = \sqrt{a_t^2 + b_t^2}$: $x_t = c_t X^{OU}_{u_t}$."""
        return jnp.hypot(self.a(t), self.b(t))

    def ou_time(self, t: ArrayLike) -> Array:
        r"""$u_t = \tfrac12\log(1 + \rho_t^2)$, the OU time with the same noise ratio (inf where a = 0)."""
        return 0.5 * jnp.log1p(jnp.square(self.rho(t)))

    def time_of_ou(self, u: ArrayLike) -> Array:
        r"""Inverse of `ou_time`: the time whose noise ratio is $\sqrt{e^{2u} - 1}$."""
        return self.time_of_rho(jnp.sqrt(jnp.expm1(2.0 * jnp.asarray(u))))

    # -- laws ---------------------------------------------------------------------------------
    def prior_std(self, t: ArrayLike) -> Array:
        r"""Standard deviation of the sampler's prior $N(0, \mathrm{std}^2 I)$ at the top time t:
        $b_t$ (the law of $x_t$ without its data term; exact where $a_t = 0$). OU and VP use
        their stationary law N(0, I)."""
        return self.b(t)

    def prior(self, dim: int, t: ArrayLike) -> dist.Distribution:
        """The prior at time t as a NumPyro distribution with event shape (dim,)."""
        std = jnp.asarray(self.prior_std(t), jnp.result_type(float))
        return dist.Normal(jnp.zeros(dim, std.dtype), std).to_event(1)

    def transition_coefficients(self, s: ArrayLike, t: ArrayLike) -> tuple[Array, Array]:
        r"""$(a_t/a_s, \sqrt{b_t^2 - (a_t/a_s)^2 b_s^2})$, $0 \le s \le t$: the law of $x_t$
        given $x_s$ is $N(r x_s, \mathrm{std}^2 I)$. Generic form $\mathrm{std} =
        a_t\sqrt{(\rho_t - \rho_s)(\rho_t + \rho_s)}$ (b_t where a_t = 0)."""
        self.check_times(t, s)
        a_t, a_s = self.a(t), self.a(s)
        r_t, r_s = self.rho(t), self.rho(s)
        std = jnp.where(
            a_t > 0, a_t * jnp.sqrt(jnp.maximum((r_t - r_s) * (r_t + r_s), 0.0)), self.b(t)
        )
        return a_t / a_s, std

    def transition(self, x_s: ArrayLike, s: ArrayLike, t: ArrayLike) -> dist.Distribution:
        r"""Law of $x_t$ given $x_s$ (shape (..., dim)); a point mass when t == s (concrete)."""
        ratio, std = self.transition_coefficients(s, t)
        x_s = jnp.asarray(x_s)
        if x_s.ndim == 0:
            raise ValueError(f"`x_s` must have a trailing data dimension, got shape {x_s.shape}")
        return _gaussian_kernel(ratio * x_s, std, concrete(jnp.asarray(t) - jnp.asarray(s)))

    def velocity(self, x: Array, t: ArrayLike, score: Array, mean: ArrayLike = 0.0) -> Array:
        r"""PF-ODE velocity $(a'/a)\,x - b^2(\rho'/\rho)\,s$ for the score s at (x, t); t a scalar
        or one time per point (shape x.shape[:-1]).

        Written as $(a'/a)(x + b^2 s) - b b' s$: by Tweedie $x + b^2 s = a\,E[x_0 \mid x_t]$, so
        where $a_t = 0$ the first term is $a'_t E[x_0]$, with `mean` the data mean $E[x_0]$
        (needed only at such a time: the linear interpolant at 1, TrigFlow at pi/2)."""
        t = jnp.asarray(t)
        a, b = self.a(t)[..., None], self.b(t)[..., None]
        a_dot, b_dot = self.a_dot(t)[..., None], self.b_dot(t)[..., None]
        safe = jnp.where(a > 0, a, 1.0)
        denoised = jnp.where(a > 0, a_dot / safe * (x + b**2 * score), a_dot * mean)
        return denoised - b * b_dot * score

    def sde_coefficients(self, t: ArrayLike) -> tuple[Array, Array]:
        r"""(f, g^2) of the forward SDE $dX = f(t) X dt + g(t) dB$ whose marginals are the path's:
        $f = a'/a$, $g^2 = 2 b^2 \rho'/\rho = 2b(b' - b a'/a)$."""
        a, b = self.a(t), self.b(t)
        f = self.a_dot(t) / a
        return f, 2 * b * (self.b_dot(t) - b * f)

    def score_integral(self, s: ArrayLike, t: ArrayLike) -> Array:
        r"""$\int_s^t a(\tau)\, d\rho_\tau^2$ (s <= t, elementwise): the score coefficient of the
        exponential integrator. Generic: 32-point Gauss-Legendre in $\tau$."""
        nodes, weights = np.polynomial.legendre.leggauss(32)
        s, t = jnp.asarray(s)[..., None], jnp.asarray(t)[..., None]
        tau = 0.5 * (t + s) + 0.5 * (t - s) * nodes
        rho = self.rho(tau)
        integrand = 2 * self.a(tau) * rho * _elementwise_derivative(self.rho, tau)
        return 0.5 * (t - s)[..., 0] * jnp.sum(weights * integrand, -1)

    def exponential_step(self, t: ArrayLike, t_next: ArrayLike) -> tuple[Array, Array, Array]:
        r"""(lin, coef, std) of one reverse-SDE exponential-integrator step from t down to
        t_next <= t with the score s frozen at (x, t): $x' = \mathrm{lin}\,x + \mathrm{coef}\,s
        + \mathrm{std}\,\xi$. The linear part is exact: in $y = x/a$ the reverse SDE is
        $dy = -(g^2/a) s\,d\tau + (g/a) dB$ with $g^2/a^2 = d\rho^2/d\tau$, so lin = $a_{t'}/a_t$,
        coef = $a_{t'}\int_{t'}^{t} a\,d\rho^2$, std = $a_{t'}\sqrt{\rho_t^2 - \rho_{t'}^2}$."""
        ratio, std = self.transition_coefficients(t_next, t)
        return 1.0 / ratio, self.a(t_next) * self.score_integral(t_next, t), std / ratio

    # -- the NumPyro program ------------------------------------------------------------------
    def model(self, x0: ArrayLike, t: ArrayLike) -> Array:
        r"""NumPyro program: site ``"xt"`` $\sim N(a_t x_0, b_t^2 I)$; x0 of shape (..., dim).
        At t == 0 (concrete) the site is a point mass at x0."""
        self.check_time("t", t)
        x0 = jnp.asarray(x0)
        if x0.ndim == 0:
            raise ValueError(f"`x0` must have a trailing data dimension, got shape {x0.shape}")
        return numpyro.sample("xt", _gaussian_kernel(self.a(t) * x0, self.b(t), concrete(t)))

    def sample(self, key: Array, x0: ArrayLike, t: ArrayLike) -> Array:
        """Draw x_t given x_0 with an explicit key; shape of `x0`."""
        self.check_time("t", t)
        x0 = jnp.asarray(x0)
        noise = jax.random.normal(prng_key("key", key), x0.shape, x0.dtype)
        return self.a(t) * x0 + self.b(t) * noise

    # -- validation and specs -----------------------------------------------------------------
    def check_time(self, name: str, t, *, positive: bool = False) -> None:
        """A concrete time (scalar or array) must be finite and in [0, t_max] (> 0 if
        `positive`); tracers pass."""
        value = concrete(t, name)
        if value is None:
            return
        for v in np.ravel(value):
            check_time(name, v, positive=positive)
        if np.any(value > self.t_max):
            raise ValueError(
                f"`{name}` must lie in the {self.name} path's time range [0, {self.t_max:g}], "
                f"got {np.max(value)}"
            )

    def check_times(self, t, s, *, s_positive: bool = False) -> None:
        """0 <= s <= t <= t_max on concrete values (scalars, or arrays elementwise)."""
        self.check_time("t", t)
        self.check_time("s", s, positive=s_positive)
        ta, sa = concrete(t), concrete(s)
        if ta is not None and sa is not None and np.any(sa > ta):
            raise ValueError(f"`s` must be <= `t` (0 <= s <= t), got s={sa} > t={ta}")

    def to_spec(self) -> dict | None:
        """A plain dict that `mcm_prob.paths.from_spec` rebuilds this path from, or None for a
        path without one (a user path of two functions)."""
        return None


def _gaussian_kernel(loc: Array, scale: Array, dt_concrete) -> dist.Distribution:
    if dt_concrete is not None and dt_concrete == 0:
        return dist.Delta(loc, event_dim=1)
    return dist.Normal(loc, jnp.broadcast_to(scale, loc.shape)).to_event(1)
