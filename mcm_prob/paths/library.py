r"""The Gaussian paths of the field, each with its closed forms (docs/conventions.md).

| path | a(t) | b(t) | time range | prior at the top time |
| --- | --- | --- | --- | --- |
| `OrnsteinUhlenbeck` | $e^{-t}$ | $\sqrt{1 - e^{-2t}}$ | $[0, \infty)$ | N(0, I) (stationary) |
| `VP(beta_min, beta_max)` | $e^{-B(t)/2}$ | $\sqrt{1 - e^{-B(t)}}$ | [0, 1] | N(0, I) |
| `VE()` (EDM) | 1 | t | $[0, \infty)$ | $N(0, T^2 I)$ |
| `LinearInterpolant()` | 1 - t | t | [0, 1] | N(0, I), exact at t = 1 |
| `TrigFlow(sigma_data)` | cos t | $\sigma_d \sin t$ | $[0, \pi/2]$ | $N(0, \sigma_d^2 I)$, exact at $\pi/2$ |

with $B(t) = \int_0^t \beta = \beta_{min} t + \tfrac12(\beta_{max} - \beta_{min}) t^2$ (score-SDE
convention $dX = -\tfrac12\beta(t) X dt + \sqrt{\beta(t)} dB$). `CustomPath(a, b, t_max=...)` is
a path from two functions. Noise ratios: OU $\sqrt{e^{2t} - 1}$, VP $\sqrt{e^{B(t)} - 1}$, VE t,
linear $t/(1 - t)$, TrigFlow $\sigma_d \tan t$.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike

from .._checks import number
from .base import AbstractPath

__all__ = [
    "OrnsteinUhlenbeck",
    "VP",
    "VE",
    "LinearInterpolant",
    "TrigFlow",
    "CustomPath",
    "OU",
    "PATHS",
    "from_spec",
    "describe",
    "as_path",
    "path_of",
]


def _t(t: ArrayLike) -> Array:
    return jnp.asarray(t, jnp.result_type(float))


class OrnsteinUhlenbeck(AbstractPath):
    r"""$dX = -X\,dt + \sqrt2\,dB$: $a = e^{-t}$, $b = \sqrt{1 - e^{-2t}}$, t in [0, inf), the
    reference paper's process and the default everywhere (`mcm_prob.OU`)."""

    t_max: ClassVar[float] = math.inf
    name: ClassVar[str] = "ou"

    @property
    def units(self) -> str:
        return "OU time (dX = -X dt + sqrt(2) dB)"

    def a(self, t):
        return jnp.exp(-jnp.asarray(t))

    def b(self, t):
        r"""$\sqrt{-\mathrm{expm1}(-2t)}$: relative accuracy for small and large t."""
        return jnp.sqrt(-jnp.expm1(-2.0 * jnp.asarray(t)))

    alpha = a
    sigma = b

    def a_dot(self, t):
        return -self.a(t)

    def b_dot(self, t):
        return jnp.exp(-2.0 * jnp.asarray(t)) / self.b(t)

    def rho(self, t):
        return jnp.sqrt(jnp.expm1(2.0 * jnp.asarray(t)))

    def time_of_rho(self, rho):
        return 0.5 * jnp.log1p(jnp.square(jnp.asarray(rho)))

    def log_rho(self, t):
        """log rho_t, finite for every t >= 0 in float32 too: e^{2t} - 1 overflows float32
        beyond t = 44, so large t use log rho = t + log(1 - e^{-2t}) / 2 (equal to round-off
        where both are finite); t = 0 gives log of the dtype's tiny number."""
        t = jnp.asarray(t)
        large = t > 15.0
        direct = jnp.log(jnp.maximum(self.rho(jnp.where(large, 0.0, t)), jnp.finfo(t.dtype).tiny))
        return jnp.where(large, t + 0.5 * jnp.log(-jnp.expm1(-2.0 * t)), direct)

    def scale(self, t):
        return jnp.ones_like(_t(t))

    def ou_time(self, t):
        return jnp.asarray(t)

    def time_of_ou(self, u):
        return jnp.asarray(u)

    def prior_std(self, t):
        return jnp.ones_like(_t(t))

    def transition_coefficients(self, s, t):
        r"""$(\alpha_{t-s}, \sigma_{t-s})$ (time-homogeneous)."""
        self.check_times(t, s)
        dt = jnp.asarray(t) - jnp.asarray(s)
        return self.a(dt), self.b(dt)

    def velocity(self, x, t, score, mean=0.0):
        return -x - score

    def sde_coefficients(self, t):
        t = _t(t)
        return -jnp.ones_like(t), 2.0 * jnp.ones_like(t)

    def score_integral(self, s, t):
        return 2 * (jnp.exp(jnp.asarray(t)) - jnp.exp(jnp.asarray(s)))

    def exponential_step(self, t, t_next):
        r"""$(e^h, 2(e^h - 1), \sqrt{e^{2h} - 1})$, $h = t - t_{next}$ (expm1 forms)."""
        h = jnp.asarray(t) - jnp.asarray(t_next)
        return jnp.exp(h), 2 * jnp.expm1(h), jnp.sqrt(jnp.expm1(2 * h))

    def to_spec(self) -> dict:
        return {"path": "ou"}


class VP(AbstractPath):
    r"""Variance preserving (score SDE / DDPM): $dX = -\tfrac12\beta(t)X\,dt + \sqrt{\beta(t)}\,dB$,
    $\beta(t) = \beta_{min} + t(\beta_{max} - \beta_{min})$, t in [0, 1]."""

    beta_min: float = eqx.field(static=True)
    beta_max: float = eqx.field(static=True)
    t_max: ClassVar[float] = 1.0
    name: ClassVar[str] = "vp"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        self.beta_min = number("beta_min", beta_min, gt=0)
        self.beta_max = number("beta_max", beta_max, ge=self.beta_min)

    @property
    def units(self) -> str:
        return f"VP time (beta from {self.beta_min:g} to {self.beta_max:g} over [0, 1])"

    def integral(self, t) -> Array:
        r"""$B(t) = \int_0^t \beta$."""
        t = jnp.asarray(t)
        return t * (self.beta_min + 0.5 * (self.beta_max - self.beta_min) * t)

    def a(self, t):
        return jnp.exp(-0.5 * self.integral(t))

    def b(self, t):
        return jnp.sqrt(-jnp.expm1(-self.integral(t)))

    def rho(self, t):
        return jnp.sqrt(jnp.expm1(self.integral(t)))

    def time_of_rho(self, rho):
        big = jnp.log1p(jnp.square(jnp.asarray(rho)))  # B(t)
        slope = self.beta_max - self.beta_min
        if slope == 0:
            return big / self.beta_min
        # t = 2B / (beta_min + sqrt(beta_min^2 + 2 slope B)): the stable root of the quadratic
        return 2 * big / (self.beta_min + jnp.sqrt(self.beta_min**2 + 2 * slope * big))

    def ou_time(self, t):
        return 0.5 * self.integral(t)

    def scale(self, t):
        return jnp.ones_like(_t(t))

    def prior_std(self, t):
        return jnp.ones_like(_t(t))

    def transition_coefficients(self, s, t):
        r"""$(e^{-\Delta B/2}, \sqrt{1 - e^{-\Delta B}})$ with $\Delta B = B(t) - B(s) =
        (t - s)(\beta_{min} + \tfrac12(\beta_{max} - \beta_{min})(t + s))$."""
        self.check_times(t, s)
        t, s = jnp.asarray(t), jnp.asarray(s)
        gap = (t - s) * (self.beta_min + 0.5 * (self.beta_max - self.beta_min) * (t + s))
        return jnp.exp(-0.5 * gap), jnp.sqrt(-jnp.expm1(-gap))

    def score_integral(self, s, t):
        r"""$2(1/a_t - 1/a_s)$ ($a = (1 + \rho^2)^{-1/2}$)."""
        return 2 * (1 / self.a(t) - 1 / self.a(s))

    def to_spec(self) -> dict:
        return {"path": "vp", "beta_min": self.beta_min, "beta_max": self.beta_max}


class VE(AbstractPath):
    r"""Variance exploding in EDM's convention: $a = 1$, $b = t$ (time = noise level $\sigma$)."""

    t_max: ClassVar[float] = math.inf
    name: ClassVar[str] = "ve"

    @property
    def units(self) -> str:
        return "EDM noise level sigma (VE: a = 1, b = t)"

    def a(self, t):
        return jnp.ones_like(_t(t))

    def b(self, t):
        return jnp.asarray(t) * 1.0

    def a_dot(self, t):
        return jnp.zeros_like(_t(t))

    def b_dot(self, t):
        return jnp.ones_like(_t(t))

    def rho(self, t):
        return self.b(t)

    def time_of_rho(self, rho):
        return jnp.asarray(rho) * 1.0

    def transition_coefficients(self, s, t):
        r"""$(1, \sqrt{(t - s)(t + s)})$."""
        self.check_times(t, s)
        t, s = jnp.asarray(t), jnp.asarray(s)
        return jnp.ones_like(t * 1.0), jnp.sqrt((t - s) * (t + s))

    def velocity(self, x, t, score, mean=0.0):
        return -jnp.asarray(t)[..., None] * score

    def score_integral(self, s, t):
        return jnp.square(jnp.asarray(t)) - jnp.square(jnp.asarray(s))

    def to_spec(self) -> dict:
        return {"path": "ve"}


class LinearInterpolant(AbstractPath):
    r"""Rectified flow / flow matching: $a = 1 - t$, $b = t$, t in [0, 1]; $x_1 = z$ exactly."""

    t_max: ClassVar[float] = 1.0
    name: ClassVar[str] = "linear"

    @property
    def units(self) -> str:
        return "interpolant time (a = 1 - t, b = t)"

    def a(self, t):
        return 1.0 - jnp.asarray(t)

    def b(self, t):
        return jnp.asarray(t) * 1.0

    def a_dot(self, t):
        return -jnp.ones_like(_t(t))

    def b_dot(self, t):
        return jnp.ones_like(_t(t))

    def time_of_rho(self, rho):
        rho = jnp.asarray(rho)
        return jnp.where(jnp.isinf(rho), 1.0, rho / (1.0 + rho))

    def transition_coefficients(self, s, t):
        r"""$((1 - t)/(1 - s), \sqrt{(t - s)(t + s - 2ts)}/(1 - s))$ (s < 1)."""
        self.check_times(t, s)
        t, s = jnp.asarray(t), jnp.asarray(s)
        return (1.0 - t) / (1.0 - s), jnp.sqrt((t - s) * (t + s - 2 * t * s)) / (1.0 - s)

    def score_integral(self, s, t):
        r"""$2[(\rho_t - \rho_s) - \log((1 + \rho_t)/(1 + \rho_s))]$ ($a = 1/(1 + \rho)$)."""
        r_t, r_s = self.rho(t), self.rho(s)
        return 2 * ((r_t - r_s) - jnp.log1p(r_t) + jnp.log1p(r_s))

    def to_spec(self) -> dict:
        return {"path": "linear"}


class TrigFlow(AbstractPath):
    r"""TrigFlow (sCM): $a = \cos t$, $b = \sigma_d \sin t$, t in $[0, \pi/2]$."""

    sigma_data: float = eqx.field(static=True)
    t_max: ClassVar[float] = math.pi / 2
    name: ClassVar[str] = "trigflow"

    def __init__(self, sigma_data: float = 1.0):
        self.sigma_data = number("sigma_data", sigma_data, gt=0)

    @property
    def units(self) -> str:
        return f"TrigFlow angle (a = cos t, b = {self.sigma_data:g} sin t)"

    def a(self, t):
        # cos(pi/2) is 6e-17 in float64, not 0: the top time is exact (x = sigma_d z there)
        t = jnp.asarray(t)
        return jnp.where(t == self.t_max, 0.0, jnp.cos(t))

    def b(self, t):
        return self.sigma_data * jnp.sin(jnp.asarray(t))

    def a_dot(self, t):
        return -jnp.sin(jnp.asarray(t))

    def b_dot(self, t):
        return self.sigma_data * jnp.cos(jnp.asarray(t))

    def time_of_rho(self, rho):
        return jnp.arctan(jnp.asarray(rho) / self.sigma_data)

    def transition_coefficients(self, s, t):
        r"""$(\cos t/\cos s, \sigma_d\sqrt{\sin(t - s)\sin(t + s)}/\cos s)$ (s < pi/2)."""
        self.check_times(t, s)
        t, s = jnp.asarray(t), jnp.asarray(s)
        c_s = jnp.cos(s)
        std = self.sigma_data * jnp.sqrt(jnp.sin(t - s) * jnp.sin(t + s)) / c_s
        return self.a(t) / c_s, std

    def score_integral(self, s, t):
        r"""$2\sigma_d^2(1/a_t - 1/a_s)$ ($a = \sigma_d/\sqrt{\sigma_d^2 + \rho^2}$)."""
        return 2 * self.sigma_data**2 * (1 / self.a(t) - 1 / self.a(s))

    def to_spec(self) -> dict:
        return {"path": "trigflow", "sigma_data": self.sigma_data}


class CustomPath(AbstractPath):
    r"""A path from two functions: `a(t)`, `b(t)` (elementwise JAX functions with a(0) = 1,
    b(0) = 0 and b/a strictly increasing on [0, t_max]). Derivatives by autodiff, the inverse
    noise ratio by bisection. It has no spec: results files record its repr."""

    a_fn: Callable = eqx.field(static=True)
    b_fn: Callable = eqx.field(static=True)
    t_max: float = eqx.field(static=True)
    label: str = eqx.field(static=True)

    def __init__(self, a: Callable, b: Callable, *, t_max: float, label: str = "custom"):
        if not (callable(a) and callable(b)):
            raise TypeError("`a` and `b` must be callables of t")
        self.t_max = number("t_max", t_max, gt=0, allow_inf=True)
        probe = jnp.linspace(0.0, self.t_max if math.isfinite(self.t_max) else 10.0, 33)[1:-1]
        a0, b0 = float(a(jnp.asarray(0.0))), float(b(jnp.asarray(0.0)))
        if abs(a0 - 1.0) > 1e-12 or abs(b0) > 1e-12:
            raise ValueError(f"a path needs a(0) = 1 and b(0) = 0, got a(0) = {a0}, b(0) = {b0}")
        ratio = jnp.asarray(b(probe)) / jnp.asarray(a(probe))
        if not bool(jnp.all(jnp.diff(ratio) > 0) & jnp.all(ratio > 0)):
            raise ValueError("`b(t) / a(t)` must be positive and strictly increasing on (0, t_max)")
        self.a_fn, self.b_fn, self.label = a, b, str(label)

    @property
    def units(self) -> str:
        return f"{self.label} path time"

    def a(self, t):
        return jnp.asarray(self.a_fn(jnp.asarray(t)))

    def b(self, t):
        return jnp.asarray(self.b_fn(jnp.asarray(t)))


OU = OrnsteinUhlenbeck()
"""The default path (docs/conventions.md)."""

PATHS: dict[str, type[AbstractPath]] = {
    "ou": OrnsteinUhlenbeck,
    "vp": VP,
    "ve": VE,
    "linear": LinearInterpolant,
    "trigflow": TrigFlow,
}
_FIELDS = {
    "ou": (),
    "vp": ("beta_min", "beta_max"),
    "ve": (),
    "linear": (),
    "trigflow": ("sigma_data",),
}


def from_spec(spec: Mapping | str) -> AbstractPath:
    """A path from its spec, e.g. ``{"path": "vp", "beta_min": 0.1, "beta_max": 20.0}`` or just
    the name ``"vp"``; unknown names or keys raise `ValueError` naming them."""
    if isinstance(spec, str):
        spec = {"path": spec}
    if not isinstance(spec, Mapping):
        raise TypeError(f"a path spec must be a name or a dict with a 'path' key, got {spec!r}")
    name = spec.get("path")
    if name not in PATHS:
        raise ValueError(f"path spec key 'path' must be one of {sorted(PATHS)}, got {name!r}")
    args = {k: v for k, v in spec.items() if k != "path"}
    unknown = sorted(set(args) - set(_FIELDS[name]))
    if unknown:
        raise ValueError(
            f"path spec for {name!r}: unknown key(s) {unknown}; accepted: {['path', *_FIELDS[name]]}"
        )
    return PATHS[name](**args)


def as_path(path, f=None) -> AbstractPath:
    """`path` checked to be an `AbstractPath`; None means the path of `f` (a fitted model knows
    the path it was trained on: its `path` attribute), else `OU`."""
    if path is None:
        own = getattr(f, "path", None)
        return own if isinstance(own, AbstractPath) else OU
    if not isinstance(path, AbstractPath):
        raise TypeError(
            "`path` must be a mcm_prob.paths.AbstractPath (mcm_prob.OU, paths.VP(), paths.VE(), "
            "paths.LinearInterpolant(), paths.TrigFlow(), paths.CustomPath(...)), got "
            f"{type(path).__name__}"
        )
    return path


def path_of(value, name: str = "`path`") -> AbstractPath:
    """A path from an `AbstractPath`, a name (``"vp"``) or a spec dict (configs and TOML);
    a bad one raises `ValueError` starting with `name`."""
    if isinstance(value, AbstractPath):
        return value
    try:
        return from_spec(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}: {err}") from err


def describe(path: AbstractPath) -> dict:
    """What a file records about a path: its spec, or ``{"path": "custom", "repr": ...}``."""
    if not isinstance(path, AbstractPath):
        raise TypeError(
            f"`path` must be a mcm_prob.paths.AbstractPath (OU, VP(), VE(), LinearInterpolant(), "
            f"TrigFlow(), CustomPath(a, b, t_max=...)), got {type(path).__name__}"
        )
    spec = path.to_spec()
    return spec if spec is not None else {"path": "custom", "repr": repr(path), "units": path.units}
