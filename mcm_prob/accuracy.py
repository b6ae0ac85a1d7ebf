r"""Steps to accuracy: the smallest number of steps (and NFE) that brings KL(law || p_delta)
below a target $\varepsilon^2$, from exact laws (no sampling noise).

* ``"consistency"``: the multi-step sampler with the exact flow at fixed step h (so $t_0 = \delta +
  Kh$ grows with K): exact Gaussian law (`sampler_law`) or, for product targets, the 1-d grid
  laws (`grid_law_1d`) summed over coordinates.
* fixed-step diffusion baselines (`mcm_prob.diffusion.BASELINES` but the adaptive one) from a
  fixed T with step (T - delta)/K: exact Gaussian laws (`baseline_law`).

KL is assumed non-increasing in K (true for these exact laws in the tested settings); the
search doubles K, then bisects.
"""

from __future__ import annotations

from collections.abc import Callable

from ._checks import integer, number
from .data import DataDistribution, Gaussian, UniformBox
from .diffusion import BASELINES, baseline_law
from .gridlaw import box_factors, product_kl
from .metrics import kl_gaussian
from .sampling import sampler_law

__all__ = ["smallest_steps", "steps_to_accuracy", "kl_of_steps"]

_NFE_PER_STEP = {"ode_heun": 2}


def smallest_steps(kl: Callable[[int], float], eps: float, *, max_steps: int = 4096) -> int | None:
    """Smallest K in [1, max_steps] with kl(K) <= eps**2, or None if even max_steps fails."""
    eps = number("eps", eps, gt=0)
    max_steps = integer("max_steps", max_steps)
    target = eps**2
    hi = 1
    while kl(hi) > target:
        if hi == max_steps:
            return None
        hi = min(2 * hi, max_steps)
    lo = hi // 2  # kl(lo) > target, or lo == 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if kl(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi


def kl_of_steps(
    data: DataDistribution,
    *,
    sampler: str = "consistency",
    delta: float,
    h: float | None = None,
    T: float | None = None,
    tau: float = 0.0,
    dim: int | None = None,
    **grid_kwargs,
) -> Callable[[int], float]:
    """K -> KL(law after K steps || p_delta) for the chosen sampler (see the module docstring).

    `dim`: for a 1-d family, the number of i.i.d. coordinates of the product target
    (KL_d = dim * KL_1). `UniformBox` uses its own coordinates.
    """
    if sampler == "consistency":
        if h is None:
            raise ValueError("`h` is required for the consistency sampler")
        if isinstance(data, Gaussian) and dim is None:
            target = data.marginal(delta)
            return lambda k: kl_gaussian(
                sampler_law(data, delta=delta, h=h, steps=k, tau=tau), target
            )
        if isinstance(data, UniformBox) and dim is None:
            factors = box_factors(data)
        elif data.dim == 1 and dim is not None:
            factors = [data] * dim
        else:
            raise ValueError(
                "exact laws exist for Gaussian data, boxes, and 1-d families with `dim` "
                f"(i.i.d. coordinates); got {type(data).__name__} with dim={dim}"
            )
        return lambda k: product_kl(factors, delta=delta, h=h, steps=k, tau=tau, **grid_kwargs)
    if sampler not in BASELINES[:-1]:
        raise ValueError(
            f"`sampler` must be 'consistency' or one of {BASELINES[:-1]}, got {sampler!r}"
        )
    if T is None:
        raise ValueError("`T` is required for the diffusion baselines")
    if not isinstance(data, Gaussian):
        raise ValueError(f"exact baseline laws need Gaussian data, got {type(data).__name__}")
    target = data.marginal(delta)
    return lambda k: kl_gaussian(baseline_law(data, sampler, T=T, delta=delta, steps=k), target)


def steps_to_accuracy(
    data: DataDistribution, eps: float, *, max_steps: int = 4096, **kwargs
) -> dict:
    """Smallest steps and NFE reaching KL <= eps^2 (keyword arguments as `kl_of_steps`).

    **Returns:** dict with ``"steps"``, ``"nfe"`` (None when not reached within `max_steps`)
    and ``"kl"`` (the KL at that number of steps, or at `max_steps`).
    """
    kl = kl_of_steps(data, **kwargs)
    k = smallest_steps(kl, eps, max_steps=max_steps)
    per_step = _NFE_PER_STEP.get(kwargs.get("sampler", "consistency"), 1)
    return {
        "steps": k,
        "nfe": None if k is None else k * per_step,
        "kl": kl(max_steps if k is None else k),
    }
