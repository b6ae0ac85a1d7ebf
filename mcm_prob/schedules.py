r"""Sampler schedules: the start and landing times of the multi-step consistency sampler.

A schedule of K steps is a pair of arrays, start times $t_0 > t_1 > \dots > t_{K-1}$ and landing
times $s_k$ with $\delta \le s_k \le t_{k+1}$ (k < K - 1) and $s_{K-1} = \delta$, the stop time.
The sampler (docs/conventions.md) starts from $x \sim N(0, I)$ at $t_0$ and, for k = 0..K-1, jumps with
$y = f(x, t_k, s_k)$ and, if k < K - 1, re-noises by the OU transition from $s_k$ to $t_{k+1}$
(gap $t_{k+1} - s_k$). The output is the last y.

Constructors (all return a validated `Schedule`):

* `Schedule.constant(delta, h, steps, tau)`: the paper's constant step, $t_k = \delta + (K-k)h$,
  $s_k = \max(t_{k+1} - \tau, \delta)$; its horizon $t_0 = \delta + Kh$ grows with K.
* `Schedule.fixed_horizon(T, delta, steps, tau)`: the same with $h = (T - \delta)/K$, to compare
  with the fixed-T diffusion baselines at the same horizon.
* `Schedule.from_start_times(t, delta, tau)`: any start times, landing by the tau rule.
* Schedules from the literature, converted to the path's time by its noise level (`path=`;
  OU by default: $\rho_t = \sigma_t/\alpha_t = \sqrt{e^{2t} - 1}$, EDM's noise level $\sigma$
  is $\rho$, $t = \tfrac12\log(1 + \rho^2)$; VE: t = rho):
  `karras` (EDM spacing $\rho_i^{1/r}$ uniform, r = 7, Karras et al. 2022), `song`
  (geometric $\rho_i$, the VE SDE of Song et al. 2021), `ect` (two steps with middle noise level
  0.821, Geng et al.'s ECT), `halving` ($t_k = T/2^k$, the baseline of Chen et al., ICML 2025).

Every constructor (and `mcm_prob.sample`, `mcm_prob.sampler_law`) takes the landing rule's
`tau` with one default, **tau = 0**: land at the next start time, composing flow maps. Pass
``tau=math.inf`` to jump to delta and re-noise at every step, as Song et al.'s multistep
Algorithm 1 does (the schedules study does so for the schedules from the literature).
"""

from __future__ import annotations

import math

import equinox as eqx
import numpy as np

from ._checks import check_size, integer, number, real_array
from .paths import as_path

__all__ = ["Schedule", "ECT_MIDDLE_SIGMA"]

ECT_MIDDLE_SIGMA = 0.821  # ECT's two-step middle noise level (EDM sigma)


def _rho(t, path=None):
    """Noise level of time t on `path` (None: OU, in numpy float64)."""
    if path is None:
        with np.errstate(over="ignore"):
            rho = np.sqrt(np.expm1(2.0 * np.asarray(t, np.float64)))
        if not np.all(np.isfinite(rho)):
            raise ValueError(
                f"the OU noise level sqrt(e^(2t) - 1) overflows float64 at T = {t}: the "
                "noise-level spacings need T below about 354"
            )
        return rho
    rho = np.asarray(path.rho(np.asarray(t, np.float64)), np.float64)
    if not np.all(np.isfinite(rho)):
        raise ValueError(
            f"the {path.name} path's noise level is infinite at T = {t}: the noise-level "
            "spacings need a finite one; use T < t_max"
        )
    return rho


def _time(rho, path=None):
    """Time of noise level rho on `path` (None: OU)."""
    if path is None:
        return 0.5 * np.log1p(np.square(np.asarray(rho, np.float64)))
    return np.array(path.time_of_rho(np.asarray(rho, np.float64)), np.float64)


def _checked_path(path):
    """None (OU, in numpy float64 as always) or a checked path."""
    return None if path is None else as_path(path)


class Schedule(eqx.Module):
    """Start times `t` (K,) and landing times `s` (K,) of a K-step sampler (module docstring).

    **Attributes:** `t`, `s` (numpy float64), `name`; properties `steps` (K), `delta`
    ($s_{K-1}$), `horizon` ($t_0$), `gaps` ($t_{k+1} - s_k$, shape (K - 1,)).

    Construct directly from arrays or with the class constructors. Invalid times raise
    `ValueError` naming the array and the violated condition.
    """

    t: np.ndarray
    s: np.ndarray
    name: str = eqx.field(static=True)

    def __init__(self, t, s, name: str = "custom"):
        t = real_array("schedule.t", t, ndim=1)
        s = real_array("schedule.s", s, ndim=1)
        if t.size < 1 or t.shape != s.shape:
            raise ValueError(
                "`schedule.t` and `schedule.s` must have the same length K >= 1, got "
                f"{t.shape} and {s.shape}"
            )
        delta = s[-1]
        if not delta > 0:
            raise ValueError(f"the last landing time (delta = s[-1]) must be > 0, got {delta!r}")
        if np.any(np.diff(t) >= 0):
            raise ValueError(f"start times `schedule.t` must be strictly decreasing, got {t}")
        if np.any(s < delta) or t[-1] < delta:
            raise ValueError(
                f"no time may lie below delta = s[-1] = {delta:g}: got t = {t}, s = {s}"
            )
        late = np.nonzero(s[:-1] > t[1:])[0]
        if late.size:
            k = int(late[0])
            raise ValueError(
                f"landing time s[{k}] = {s[k]:g} is after the next start time t[{k + 1}] = "
                f"{t[k + 1]:g}; need s[k] <= t[k+1] (the sampler re-noises from s[k] to t[k+1])"
            )
        self.t, self.s, self.name = t, s, str(name)

    @property
    def steps(self) -> int:
        return int(self.t.size)

    @property
    def delta(self) -> float:
        return float(self.s[-1])

    @property
    def horizon(self) -> float:
        return float(self.t[0])

    @property
    def gaps(self) -> np.ndarray:
        return self.t[1:] - self.s[:-1]

    def __repr__(self) -> str:
        return (
            f"Schedule({self.name!r}, steps={self.steps}, t={np.round(self.t, 6).tolist()}, "
            f"s={np.round(self.s, 6).tolist()})"
        )

    # -- constructors -------------------------------------------------------------------------
    @classmethod
    def from_start_times(cls, t, *, delta: float, tau: float = 0.0, name: str = "custom"):
        r"""Start times `t` (K,), landing $s_k = \max(t_{k+1} - \tau, \delta)$, $s_{K-1} = \delta$."""
        delta = number("delta", delta, gt=0)
        return cls(*_land(real_array("t", t, ndim=1), delta, tau), name)

    @classmethod
    def constant(cls, *, delta: float, h: float, steps: int, tau: float = 0.0):
        r"""The paper's constant step: $t_k = \delta + (K - k)h$ (horizon $\delta + Kh$)."""
        delta, h = number("delta", delta, gt=0), number("h", h, gt=0)
        k = _steps(steps)
        _check_resolution("h", h, delta + k * h, k)
        t = delta + (k - np.arange(k)) * h
        return cls.from_start_times(t, delta=delta, tau=tau, name="constant")

    @classmethod
    def fixed_horizon(cls, *, T: float, delta: float, steps: int, tau: float = 0.0):
        r"""Constant step $h = (T - \delta)/K$ from the fixed horizon $t_0 = T$."""
        delta, T, k, _ = _horizon(T, delta, steps)
        sched = cls.constant(delta=delta, h=(T - delta) / k, steps=k, tau=tau)
        return cls(sched.t, sched.s, "fixed_horizon")

    @classmethod
    def karras(
        cls, *, T: float, delta: float, steps: int, rho: float = 7.0, tau: float = 0.0, path=None
    ):
        r"""EDM spacing: $\rho_i = (\rho_{max}^{1/r} + \tfrac iK(\rho_{min}^{1/r} -
        \rho_{max}^{1/r}))^r$, i = 0..K, between $\rho_{max} = \rho_T$ and $\rho_{min} =
        \rho_\delta$; start times are the first K (Karras et al. 2022, r = `rho`). Times of
        `path` (default OU), through its noise level."""
        delta, T, k, r = _horizon(T, delta, steps)
        r, path = number("rho", rho, gt=0), _checked_path(path)
        lo, hi = _rho(delta, path) ** (1 / r), _rho(T, path) ** (1 / r)
        t = _time((hi + np.arange(k) / k * (lo - hi)) ** r, path)
        t[0] = T  # exact horizon (the time change round-trips to within an ulp)
        return cls(*_land(t, delta, tau), "karras")

    @classmethod
    def song(cls, *, T: float, delta: float, steps: int, tau: float = 0.0, path=None):
        r"""Geometric noise levels $\rho_i = \rho_T (\rho_\delta/\rho_T)^{i/K}$, i = 0..K-1
        (the VE SDE discretisation of Song et al. 2021), in the times of `path` (default OU)."""
        delta, T, k, _ = _horizon(T, delta, steps)
        path = _checked_path(path)
        lo, hi = math.log(_rho(delta, path)), math.log(_rho(T, path))
        t = _time(np.exp(hi + np.arange(k) / k * (lo - hi)), path)
        t[0] = T
        return cls(*_land(t, delta, tau), "song")

    @classmethod
    def ect(
        cls,
        *,
        T: float,
        delta: float,
        middle_sigma: float = ECT_MIDDLE_SIGMA,
        tau: float = 0.0,
        path=None,
    ):
        r"""ECT's two-step sampler: start at T, then at the middle noise level
        $\rho = 0.821$ (OU: $t = \tfrac12\log(1 + 0.821^2) \approx 0.2637$; VE: t = 0.821),
        in the times of `path` (default OU)."""
        delta, T, _, _ = _horizon(T, delta, 2)
        path = _checked_path(path)
        mid = float(_time(number("middle_sigma", middle_sigma, gt=0), path))
        if not delta < mid < T:
            raise ValueError(
                f"the middle time t = {mid:.4g} of `middle_sigma` = {middle_sigma} must lie in "
                f"(delta, T) = ({delta:g}, {T:g})"
            )
        return cls(*_land(np.array([T, mid]), delta, tau), "ect")

    @classmethod
    def halving(cls, *, T: float, delta: float, steps: int, tau: float = 0.0):
        r"""$t_k = T / 2^k$, k = 0..K-1 (Chen et al., ICML 2025, baseline 2)."""
        delta, T, k, _ = _horizon(T, delta, steps)
        t = T / 2.0 ** np.arange(k)
        if t[-1] <= delta:
            raise ValueError(
                f"`steps` = {k} halvings of T = {T:g} reach {t[-1]:.3g} <= delta = {delta:g}; "
                "use fewer steps or a larger T"
            )
        return cls(*_land(t, delta, tau), "halving")


def _horizon(T, delta, steps):
    delta = number("delta", delta, gt=0)
    T, k = number("T", T, gt=delta), _steps(steps)
    _check_resolution("T", (T - delta) / k, T, k)
    return delta, T, k, None


def _check_resolution(name: str, step: float, top: float, k: int) -> None:
    """Refuse K steps of size `step` below `top` that float64 cannot tell apart (a step within
    4 ulp of `top`): the times would coincide, a degenerate schedule."""
    if not step > 4 * np.spacing(top):
        raise ValueError(
            f"`{name}` gives {k} step(s) of {step:.3g} below {top:.17g}, within float64's "
            f"resolution there ({np.spacing(top):.3g}): the times would coincide; widen the "
            "interval between `delta` and the horizon or take fewer steps"
        )


def _steps(steps) -> int:
    k = integer("steps", steps)
    check_size("steps", 8 * 8 * k, f"{k} steps")  # the times and the sampler's per-step arrays
    return k


def _land(t, delta, tau):
    tau = number("tau", tau, ge=0, allow_inf=True)
    s = np.maximum(np.append(t[1:], delta) - tau, delta)
    s[-1] = delta
    return t, s


def as_schedule(schedule=None, *, delta=None, h=None, steps=None, tau=0.0) -> Schedule:
    """The sampler's schedule from either a `Schedule` or the constant-step arguments."""
    if schedule is not None:
        if not isinstance(schedule, Schedule):
            raise TypeError(
                f"`schedule` must be a mcm_prob.Schedule, got {type(schedule).__name__}"
            )
        if any(v is not None for v in (delta, h, steps)) or tau != 0.0:
            raise ValueError(
                "pass either `schedule` or the constant-step arguments `delta`, `h`, `steps`, "
                "`tau`, not both"
            )
        return schedule
    missing = [n for n, v in (("delta", delta), ("h", h), ("steps", steps)) if v is None]
    if missing:
        raise ValueError(
            f"missing {missing}: pass `schedule=` or all of `delta`, `h`, `steps` (and `tau`)"
        )
    return Schedule.constant(delta=delta, h=h, steps=steps, tau=tau)
