r"""Data families from 1-d densities, without writing a NumPyro distribution.

**`Density1D`**: a 1-d log-density (a vectorised function, unnormalised allowed, or its values)
on an interval [low, high], outside which it is taken as zero. It is read at the midpoints
$x_i$ of n equal cells of width h and replaced by the Gaussian mixture

$$\tilde p = \sum_i w_i\, N(x_i, h^2), \qquad w_i \propto p(x_i),$$

that is $\tilde X = X_h + h\varepsilon$ with $X_h$ the midpoint quadrature of X. On a path,
$\tilde p_t = \sum_i w_i N(a_t x_i, a_t^2 h^2 + b_t^2)$: the marginals, scores, CDFs and flows of
$\tilde p$ are exact (a `GaussianMixture` underneath, so `ClosedFormCDF`: 1-d grid laws and
exact KL work). **Accuracy** against p: the bumps add $h^2$ to the variance
($\tilde p = p + \tfrac{h^2}{2}p'' + O(h^4)$ for smooth p, so errors are $O((h/\ell)^2)$ with
$\ell$ the scale on which p varies; second order in h for the density, and for p with kinks
or jumps too away from them once $b_t \gg a_t h$); the quadrature's ripple is about
$2e^{-2\pi^2} \approx 5\cdot 10^{-9}$ relative (Poisson summation with bump width equal to the
node spacing). For a Gaussian p, $\tilde p_t$ is $N(a_t m, a_t^2 (v + h^2) + b_t^2)$ to that
ripple: the test of this module. The regime is declared by the user (``"nonsmooth"`` for a
density with a kink or a jump, e.g. Laplace or uniform).

**`Product`**: independent coordinates, each a 1-d family (`Density1D` or any built-in or
user 1-d family): the marginal is the product law, the score the concatenation of the
factors' scores, and as `ProductData` the grid laws and exact KL add up over coordinates.

Both have specs (``"density_1d"``: low, high, the log-density's values, regime;
``"product"``: the factors' specs), so studies and saved models rebuild them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jaxtyping import Array, ArrayLike
from numpyro.distributions import constraints

from ._checks import integer, number, one_of
from .data import (
    ClosedFormCDF,
    DataDistribution,
    GaussianMixture,
    ProductData,
    check_data,
    from_spec,
    register_family,
)

__all__ = ["Density1D", "Product", "ProductLaw"]

_REGIMES = ("smooth", "nonsmooth")


@register_family
class Density1D(ClosedFormCDF):
    r"""A 1-d family from a log-density by quadrature (module docstring).

    **Arguments:** `log_density`: a function of a float64 array of shape (n,) returning the
    log-density there (unnormalised; -inf where p = 0), or the n values at the cell midpoints
    `low + (i + 1/2) h`, h = (high - low)/n; `low` < `high`: the interval (p is zero outside);
    `n`: cells (default 2048; errors scale as h^2); `regime`: ``"smooth"`` or ``"nonsmooth"``.
    """

    low: float = eqx.field(static=True)
    high: float = eqx.field(static=True)
    log_values: Array
    mixture: GaussianMixture
    regime: str = eqx.field(static=True)
    family = "density_1d"
    spec_fields = ("log_density", "low", "high", "regime")

    def __init__(
        self,
        log_density: Callable | ArrayLike,
        low: float,
        high: float,
        *,
        n: int | None = None,
        regime: str = "smooth",
    ):
        low, high = number("low", low), number("high", high)
        if not low < high:
            raise ValueError(f"need `low` < `high`, got {low} and {high}")
        self.regime = one_of("regime", regime, _REGIMES)
        if callable(log_density):
            n = integer("n", 2048 if n is None else n, ge=16, lt=2**16 + 1)
            x = low + (np.arange(n) + 0.5) * (high - low) / n
            values = np.asarray(log_density(jnp.asarray(x, jnp.float64)), np.float64)
            if values.shape != (n,):
                raise ValueError(
                    f"`log_density` must map the (n,) midpoints to (n,) values, got {values.shape}"
                )
        else:
            values = np.asarray(log_density, np.float64)
            if values.ndim != 1 or not 16 <= values.size <= 2**16:
                raise ValueError(
                    "`log_density` given as values must be 1-d with 16 to 65536 entries, got "
                    f"shape {values.shape}"
                )
            if n is not None and n != values.size:
                raise ValueError(f"`n` = {n} but `log_density` has {values.size} values")
            n = values.size
        if np.any(np.isnan(values) | (values == np.inf)):
            raise ValueError(
                "`log_density` must be finite or -inf at every midpoint (no NaN, +inf)"
            )
        if not np.any(np.isfinite(values)):
            raise ValueError(f"`log_density` is -inf on all of [{low}, {high}]: no mass there")
        h = (high - low) / n
        x = low + (np.arange(n) + 0.5) * h
        log_w = values - np.max(values)
        w = np.exp(log_w)
        keep = w > 0  # cells whose weight underflows carry no mass
        w = w[keep] / w[keep].sum()
        self.low, self.high, self.log_values = low, high, jnp.asarray(values)
        self.mixture = GaussianMixture(w, x[keep, None], np.full((w.size, 1, 1), h * h))

    @property
    def dim(self) -> int:
        return 1

    @property
    def spacing(self) -> float:
        """The cell width h (the bumps' standard deviation)."""
        return (self.high - self.low) / self.log_values.shape[0]

    def data_law(self):
        return self.mixture.data_law()

    def noised_law(self, a, b):
        return self.mixture.noised_law(a, b)

    def noised_score(self, x, a, b):
        return self.mixture.noised_score(x, a, b)

    def noised_log_cdfs(self, x, a, b):
        return self.mixture.noised_log_cdfs(x, a, b)

    def to_spec(self) -> dict:
        return {
            "family": self.family,
            "log_density": np.asarray(self.log_values).tolist(),
            "low": self.low,
            "high": self.high,
            "regime": self.regime,
        }


@register_family
class Product(ProductData):
    r"""Independent coordinates $X_0 = (X^{(1)}, \dots, X^{(d)})$, each a 1-d family.

    **Arguments:** `factors`: a sequence of 1-d `DataDistribution`s or their specs (the same
    object may repeat: its grid law is then computed once). Non-smooth when any factor is.
    $p_t$ is the product of the factors' $p_t$ (`ProductLaw`), the score their concatenation.
    """

    parts: tuple[DataDistribution, ...]
    regime: str = eqx.field(static=True)
    family = "product"
    spec_fields = ("factors",)

    def __init__(self, factors: Sequence[DataDistribution | Mapping]):
        if isinstance(factors, (str, bytes, Mapping)) or not isinstance(factors, Sequence):
            raise TypeError("`factors` must be a list of 1-d data distributions or their specs")
        if not factors:
            raise ValueError("`factors` must name at least one 1-d family")
        parts = []
        for i, f in enumerate(factors):
            f = from_spec(f) if isinstance(f, Mapping) else f
            check_data(f"factors[{i}]", f)
            if f.dim != 1:
                raise ValueError(f"`factors[{i}]` must be 1-d, got dim {f.dim}")
            parts.append(f)
        self.parts = tuple(parts)
        smooth = all(p.regime == "smooth" for p in parts)
        self.regime = "smooth" if smooth else "nonsmooth"

    @property
    def dim(self) -> int:
        return len(self.parts)

    def factors(self) -> list[DataDistribution]:
        return list(self.parts)

    def data_law(self):
        return ProductLaw([p.data_law() for p in self.parts])

    def noised_law(self, a, b):
        return ProductLaw([p.noised_law(a, b) for p in self.parts])

    def noised_score(self, x, a, b):
        return jnp.concatenate(
            [p.noised_score(x[..., i : i + 1], a, b) for i, p in enumerate(self.parts)], axis=-1
        )

    def to_spec(self) -> dict | None:
        specs = [p.to_spec() for p in self.parts]
        return None if None in specs else {"family": self.family, "factors": specs}


class ProductLaw(dist.Distribution):
    """The product of distributions with event shape (1,) (or (k,)), as one distribution with
    event shape (total,): `log_prob` adds the parts', `sample` concatenates their draws."""

    arg_constraints = {}
    support = constraints.real_vector
    pytree_data_fields = ("laws",)

    def __init__(self, laws: Sequence[dist.Distribution], *, validate_args=None):
        self.laws = list(laws)
        self._sizes = [law.event_shape[-1] for law in self.laws]
        batch = jax.lax.broadcast_shapes(*(law.batch_shape for law in self.laws))
        super().__init__(batch, (sum(self._sizes),), validate_args=validate_args)

    def _split(self, value):
        return jnp.split(value, np.cumsum(self._sizes)[:-1], axis=-1)

    def sample(self, key, sample_shape=()):
        keys = jax.random.split(key, len(self.laws))
        draws = [law.sample(k, sample_shape) for law, k in zip(self.laws, keys, strict=True)]
        return jnp.concatenate(draws, axis=-1)

    def log_prob(self, value):
        parts = self._split(value)
        return sum(law.log_prob(v) for law, v in zip(self.laws, parts, strict=True))

    @property
    def mean(self):
        return jnp.concatenate([law.mean for law in self.laws], axis=-1)

    @property
    def variance(self):
        return jnp.concatenate([law.variance for law in self.laws], axis=-1)
