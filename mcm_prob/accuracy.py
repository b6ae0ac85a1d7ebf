r"""Steps to accuracy: the smallest number of steps (and NFE) that brings KL(law || p_delta)
below a target $\varepsilon^2$, from exact laws (no sampling noise).

* ``"consistency"``: the multi-step sampler with the exact flow, on the constant step h (so
  $t_0 = \delta + Kh$ grows with K), on the constant step of a fixed horizon T, or on any
  family of schedules `schedule(K) -> Schedule`: exact Gaussian law (`sampler_law`) or, for
  product targets, the 1-d grid laws (`grid_law_1d`) summed over coordinates.
* fixed-step diffusion baselines (`mcm_prob.diffusion.BASELINES` but the adaptive one) from a
  fixed T with step (T - delta)/K: exact Gaussian laws (`baseline_law`).

KL is assumed non-increasing in K (true for these exact laws in the tested settings); the
search doubles K, then bisects. When the target is not reached, `steps_to_accuracy` says why:
the step budget ran out, and, at a fixed horizon T, the start error $KL(N(0, I) \| p_T)$ (a floor
for the deterministic samplers: the exact flow preserves KL).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ._checks import integer, number
from .data import ClosedFormGaussian, DataDistribution, ProductData
from .diffusion import BASELINES, baseline_law
from .gridlaw import product_kl
from .metrics import kl_gaussian
from .paths import OU, AbstractPath
from .sampling import sampler_law
from .schedules import Schedule

__all__ = [
    "smallest_steps",
    "first_reaching",
    "steps_to_accuracy",
    "kl_of_steps",
    "schedule_kl",
    "start_error",
    "product_factors",
]

_NFE_PER_STEP = {"ode_heun": 2}


def smallest_steps(kl: Callable[[int], float], eps: float, *, max_steps: int = 4096) -> int | None:
    """Smallest K in [1, max_steps] with kl(K) <= eps**2, or None if even max_steps fails."""
    eps = number("eps", eps, gt=0)
    max_steps = integer("max_steps", max_steps)
    target = eps**2

    def checked(k):
        value = kl(k)
        if not math.isfinite(value):
            raise FloatingPointError(f"kl({k}) = {value!r} is not a finite number")
        return value

    hi = 1
    while checked(hi) > target:
        if hi == max_steps:
            return None
        hi = min(2 * hi, max_steps)
    lo = hi // 2  # kl(lo) > target, or lo == 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if checked(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi


def first_reaching(kl, steps, eps) -> list[float]:
    """Per target e in `eps`, the first K of `steps` whose KL (`kl`, aligned with `steps`) is
    <= e^2, as a float (NaN when none is): steps to accuracy read off a tabulated grid."""
    return [
        next((float(k) for k, v in zip(steps, kl, strict=True) if v <= e**2), np.nan) for e in eps
    ]


def _schedules(delta, h, T, tau, schedule) -> Callable[[int], Schedule]:
    if schedule is not None:
        if not callable(schedule):
            raise TypeError("`schedule` must be a callable steps -> mcm_prob.Schedule")
        return schedule
    if h is not None:
        return lambda k: Schedule.constant(delta=delta, h=h, steps=k, tau=tau)
    if T is not None:
        return lambda k: Schedule.fixed_horizon(T=T, delta=delta, steps=k, tau=tau)
    raise ValueError("the consistency sampler needs `h`, `T` (fixed horizon) or `schedule`")


def product_factors(data: DataDistribution, dim: int | None = None) -> list:
    """The 1-d factors of a product target: a box's coordinates, or `dim` i.i.d. copies of a
    1-d family."""
    if isinstance(data, ProductData) and dim is None:
        return data.factors()
    if data.dim == 1 and dim is not None:
        return [data] * integer("dim", dim)
    raise ValueError(
        "exact laws exist for Gaussian data, boxes, and 1-d families with `dim` "
        f"(i.i.d. coordinates); got {type(data).__name__} with dim={dim}"
    )


def schedule_kl(
    data: DataDistribution,
    schedule: Schedule,
    *,
    perturbation=None,
    dim=None,
    path: AbstractPath = OU,
    **grid_kwargs,
) -> float:
    """Exact KL(law of the exact-flow sampler on `schedule` || p_delta) on `path`: the float64
    Gaussian law (with an optional affine `perturbation`, as `sampler_law`) or, for product
    targets (a box, or a 1-d family with `dim` i.i.d. coordinates), the sum of the 1-d grid
    laws."""
    if isinstance(data, ClosedFormGaussian) and dim is None:
        law = sampler_law(data, schedule=schedule, perturbation=perturbation, path=path)
        return kl_gaussian(law, data.marginal(schedule.delta, path))
    if perturbation is not None:
        raise ValueError("`perturbation` applies to Gaussian data only")
    return product_kl(product_factors(data, dim), schedule=schedule, path=path, **grid_kwargs)


def kl_of_steps(
    data: DataDistribution,
    *,
    sampler: str = "consistency",
    delta: float,
    h: float | None = None,
    T: float | None = None,
    tau: float = 0.0,
    schedule: Callable[[int], Schedule] | None = None,
    dim: int | None = None,
    path: AbstractPath = OU,
    **grid_kwargs,
) -> Callable[[int], float]:
    """K -> KL(law after K steps || p_delta) for the chosen sampler (see the module docstring).

    Consistency sampler: constant step `h` (with `tau`), else the constant step of the fixed
    horizon `T`, else `schedule`, a callable K -> `Schedule`. `dim`: for a 1-d family, the number
    of i.i.d. coordinates of the product target (KL_d = dim * KL_1). `UniformBox` uses its own
    coordinates.
    """
    if sampler == "consistency":
        family = _schedules(delta, h, T, tau, schedule)
        if not isinstance(data, ClosedFormGaussian) or dim is not None:
            product_factors(data, dim)  # refuse data without exact laws before any work
        return lambda k: schedule_kl(data, family(k), dim=dim, path=path, **grid_kwargs)
    if sampler not in BASELINES[:-1]:
        raise ValueError(
            f"`sampler` must be 'consistency' or one of {BASELINES[:-1]}, got {sampler!r}"
        )
    if T is None:
        raise ValueError("`T` is required for the diffusion baselines")
    if not isinstance(data, ClosedFormGaussian):
        raise ValueError(f"exact baseline laws need Gaussian data, got {type(data).__name__}")
    target = data.marginal(delta, path)
    return lambda k: kl_gaussian(
        baseline_law(data, sampler, T=T, delta=delta, steps=k, path=path), target
    )


def start_error(data: DataDistribution, T: float, *, dim=None, path=OU, **grid_kwargs):
    """KL(prior || p_T) on `path` (OU: KL(N(0, I) || p_T)): the error of starting the samplers
    at T. The exact flow preserves KL, so this is also the KL of the one-step exact-flow
    sampler from T to any stop time; it is computed at T itself (the one-step schedule landing
    at T: no flow, no stop time needed), exactly for Gaussian data and by the 1-d grid laws of
    `schedule_kl` for product targets."""
    T = number("T", T, gt=0)
    return schedule_kl(data, Schedule([T], [T], "start"), dim=dim, path=path, **grid_kwargs)


def steps_to_accuracy(
    data: DataDistribution, eps: float, *, max_steps: int = 4096, **kwargs
) -> dict:
    """Smallest steps and NFE reaching KL <= eps^2 (keyword arguments as `kl_of_steps`).

    **Returns:** dict with ``"steps"``, ``"nfe"`` (None when not reached within `max_steps`),
    ``"kl"`` (the KL at that number of steps, or at `max_steps`), ``"start_kl"``
    (KL(N(0, I) || p_T) when the horizon T is fixed, else None) and ``"reason"`` (None when
    reached, else why not).
    """
    kl = kl_of_steps(data, **kwargs)
    k = smallest_steps(kl, eps, max_steps=max_steps)
    sampler = kwargs.get("sampler", "consistency")
    per_step = _NFE_PER_STEP.get(sampler, 1)
    value = kl(max_steps if k is None else k)
    horizon = None
    if sampler != "consistency" or kwargs.get("h") is None:
        horizon = kwargs.get("T")
        if horizon is None and kwargs.get("schedule") is not None:
            first, last = kwargs["schedule"](1).horizon, kwargs["schedule"](max_steps).horizon
            horizon = first if math.isclose(first, last) else None
    grid = {n: v for n, v in kwargs.items() if n in ("dim", "n_grid", "half_width", "grid", "path")}
    start = None if horizon is None else start_error(data, horizon, **grid)
    reason = None
    if k is None:
        reason = f"max_steps = {max_steps} ran out: KL = {value:.3g} > eps^2 = {eps**2:.3g}"
        if start is not None:
            deterministic = sampler.startswith("ode") or (
                sampler == "consistency"
                and kwargs.get("schedule") is None
                and kwargs.get("tau", 0.0) == 0.0
            )
            reason += f"; the start error KL(N(0, I) || p_T) at T = {horizon:g} is {start:.3g}" + (
                ", which a deterministic sampler cannot reduce: increase T"
                if deterministic and start > eps**2
                else ""
            )
    return {
        "steps": k,
        "nfe": None if k is None else k * per_step,
        "kl": value,
        "start_kl": start,
        "reason": reason,
    }
