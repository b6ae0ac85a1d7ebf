r"""Data distributions as NumPyro programs, with their exact marginals and scores on every path.

Every family has `.dim`, `.regime` (``"smooth"`` or ``"nonsmooth"``), `.model(n)` (a NumPyro
program with site ``"x0"``), `.sample(key, n)`, `.marginal(t, path=OU)` (a NumPyro distribution
equal to $p_t$, the law of $X_t = a_t X_0 + b_t Z$ on the Gaussian path `path`) and
`.score(x, t, path=OU)` $= \nabla_x \log p_t(x)$.

A family is written once, path-free: it implements the law and the score of $a X_0 + b Z$ for
coefficients $a \ge 0$, $b > 0$ (`noised_law(a, b)`, `noised_score(x, a, b)`; the
noise-ratio form $X_0 + \rho Z$ is a = 1, b = rho), and every path follows by $a = a(t)$,
$b = b(t)$.

Gaussian mixtures (Diracs are Gaussians with zero covariance) use the eigendecomposition
$\Sigma_k = U_k \operatorname{diag}(\lambda_k) U_k^\top$, computed once in float64, so that
the covariance of $a X_0 + b Z$ is $U_k \operatorname{diag}(\nu_k) U_k^\top$ with
$\nu_k = a^2 \lambda_k + b^2$ and all terms are evaluated in that basis (stable for singular $\Sigma_k$ and small t).

Regimes: a family is ``"smooth"`` when its score is Lipschitz down to t = 0 (all covariances
positive definite); otherwise ``"nonsmooth"``, and then `marginal(0)` and `score(x, 0)` raise:
$p_0$ has no Lebesgue density, and samplers must stop early at some delta > 0.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import hashlib
import inspect
import sys
from collections.abc import Mapping
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax.scipy.special import log_ndtr, logsumexp
from jaxtyping import Array, ArrayLike
from numpyro.distributions import constraints
from numpyro.distributions.util import lazy_property

from ._checks import (
    check_points,
    check_time,
    concrete,
    finite_or_raise,
    integer,
    number,
    prng_key,
    real_array,
)
from .paths import OU, AbstractPath, as_path

__all__ = [
    "DataDistribution",
    "ClosedFormGaussian",
    "ProductData",
    "ClosedFormCDF",
    "from_spec",
    "describe",
    "rebuild",
    "register_family",
    "FAMILIES",
    "check_data",
    "Gaussian",
    "GaussianMixture",
    "DiracMixture",
    "UniformBox",
    "NoisyUniform",
    "Atoms",
    "DegenerateNormal",
    "EigenNormal",
]

_LOG_2PI = float(np.log(2.0 * np.pi))
_GRAM_ATOMS = 64  # Dirac mixtures with more atoms evaluate the score in the Gram form


def _eigh_psd(name: str, cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric PSD check and eigendecomposition in float64.

    Eigenvalues below `dim * eps * max|lambda|` (numerical rank tolerance, as in
    `numpy.linalg.matrix_rank`) are set to exactly 0; clearly negative ones raise.
    """
    d = cov.shape[-1]
    scale = max(float(np.max(np.abs(cov))), np.finfo(np.float64).tiny)
    if not np.allclose(cov, np.swapaxes(cov, -1, -2), rtol=0.0, atol=1e-10 * scale):
        raise ValueError(f"`{name}` must be symmetric")
    lam, vecs = np.linalg.eigh(cov)
    tol = d * np.finfo(np.float64).eps * np.max(np.abs(lam), axis=-1, keepdims=True)
    if np.any(lam < -np.maximum(tol, 1e-12 * scale)):
        raise ValueError(
            f"`{name}` must be positive semi-definite, got eigenvalue {float(lam.min()):.3g} < 0"
        )
    lam = np.where(lam <= tol, 0.0, lam)
    return lam, vecs


def _weights(weights, k: int | None = None) -> np.ndarray:
    w = real_array("weights", weights, ndim=1)
    if w.size == 0:
        raise ValueError("`weights` must be non-empty")
    if k is not None and w.size != k:
        raise ValueError(f"`weights` has {w.size} entries but there are {k} components")
    if np.any(w < 0):
        raise ValueError("`weights` must be non-negative")
    given = np.result_type(getattr(weights, "dtype", np.float64))
    tol = max(1e-8, 8 * float(np.finfo(given).eps)) if given.kind == "f" else 1e-8
    if abs(w.sum() - 1.0) > tol:
        raise ValueError(f"`weights` must sum to 1 (within {tol:.2g}), got sum {w.sum():.12g}")
    return w / w.sum()


def _x0_factor(cov: np.ndarray, lam: np.ndarray, vecs: np.ndarray, regime: str) -> np.ndarray:
    """Sampling factor F with cov = F F^T, computed once: Cholesky (PD) or U sqrt(lambda)."""
    return np.linalg.cholesky(cov) if regime == "smooth" else vecs * np.sqrt(lam)


def _mixture_terms(x: Array, a, b, means: Array, lam: Array, vecs: Array | None):
    r"""Per-component log-densities and scores of $N(a \mu_k, a^2\Sigma_k + b^2 I)$ at x.

    x: (..., d); a, b: scalars or shape (...) (one pair per point); means, lam: (K, d); vecs:
    (K, d, d) eigenvectors (columns) or None for the identity. Returns (logpdf (..., K),
    score (..., K, d)).
    """
    a, b = jnp.asarray(a)[..., None, None], jnp.asarray(b)[..., None, None]
    nu = a**2 * lam + b**2
    diff = x[..., None, :] - a * means
    proj = diff if vecs is None else jnp.einsum("...kd,kde->...ke", diff, vecs)
    d = means.shape[-1]
    logpdf = -0.5 * (jnp.sum(proj**2 / nu, -1) + jnp.sum(jnp.log(nu), -1) + d * _LOG_2PI)
    logpdf = jnp.broadcast_to(logpdf, diff.shape[:-1])
    white = proj / nu
    score = -(white if vecs is None else jnp.einsum("kde,...ke->...kd", vecs, white))
    return logpdf, score


def _mixture_score(x, a, b, log_w, means, lam, vecs) -> Array:
    logpdf, scores = _mixture_terms(x, a, b, means, lam, vecs)
    resp = jax.nn.softmax(log_w + logpdf, axis=-1)
    return jnp.einsum("...k,...kd->...d", resp, scores)


def _cov_ab(a, b, lam: Array, vecs: Array) -> Array:
    nu = a**2 * lam + b**2
    return jnp.einsum("...ij,...j,...kj->...ik", vecs, nu, vecs)


class DataDistribution(eqx.Module):
    r"""Abstract base of every data family: subclass it to study your own data.

    A subclass provides `regime` (``"smooth"`` or ``"nonsmooth"``: a field, a property, or
    ``regime: ClassVar[str] = "smooth"``; a bare ``regime = ...`` is not enough for equinox)
    and implements the four abstract members below, once and for every Gaussian path; everything
    else (`model`, `sample`, the validated `marginal` and `score` on any path, the exact flow by
    ODE, training, samplers, studies) comes with the base. A subclass that misses one cannot be
    instantiated, and the error names it.

    * `dim` (property): the data dimension d.
    * `data_law()`: the law of $X_0$, a NumPyro distribution with event shape (d,).
    * `noised_law(a, b)`: the law of $a X_0 + b Z$ for scalars a >= 0, b > 0 (possibly tracers).
    * `noised_score(x, a, b)`: $\nabla_x \log$ of that law, for x of shape (..., d), with a, b
      scalars or one pair per point (shape x.shape[:-1]); jit-traceable, no argument checks (the
      flow map, the teachers and the baselines call it inside compiled loops).

    On the path `path`, $p_t$ is `noised_law(path.a(t), path.b(t))`.

    Optionally, set the class variables `family` (a name) and `spec_fields` (constructor
    arguments) and call `register_family` so that `to_spec` / `from_spec` store and rebuild it;
    without them a study stores the object by class path, repr and a hash of its arrays.

    Example (an isotropic Gaussian $N(c, v I)$, so that $a X_0 + b Z \sim N(a c, (a^2 v +
    b^2) I)$)::

        class Isotropic(mcm_prob.data.DataDistribution):
            center: jax.Array
            var: float
            regime: ClassVar[str] = "smooth"

            @property
            def dim(self):
                return self.center.shape[-1]

            def data_law(self):
                return dist.Normal(self.center, jnp.sqrt(self.var)).to_event(1)

            def noised_law(self, a, b):
                return dist.Normal(a * self.center, jnp.sqrt(a**2 * self.var + b**2)).to_event(1)

            def noised_score(self, x, a, b):
                a, b = jnp.asarray(a)[..., None], jnp.asarray(b)[..., None]
                return -(x - a * self.center) / (a**2 * self.var + b**2)
    """

    regime: eqx.AbstractVar[str]
    family: ClassVar[str | None] = None
    spec_fields: ClassVar[tuple[str, ...]] = ()

    @property
    @abc.abstractmethod
    def dim(self) -> int:
        """The data dimension d."""

    @abc.abstractmethod
    def data_law(self) -> dist.Distribution:
        """The law of X_0 (event shape (dim,))."""

    @abc.abstractmethod
    def noised_law(self, a, b) -> dist.Distribution:
        """The law of a X_0 + b Z, a >= 0, b > 0, without argument checks (class docstring)."""

    @abc.abstractmethod
    def noised_score(self, x: Array, a, b) -> Array:
        """grad log of the law of a X_0 + b Z at x, without argument checks; a, b scalars or of
        shape x.shape[:-1]."""

    def model(self, n: int | None = None) -> Array:
        """NumPyro program sampling site ``"x0"``: shape (dim,) or (n, dim) in plate ``"data"``."""
        plate = contextlib.nullcontext() if n is None else numpyro.plate("data", integer("n", n))
        with plate:
            return numpyro.sample("x0", self.data_law())

    def sample(self, key: Array, n: int) -> Array:
        """n exact draws from the data law with an explicit key: shape (n, dim)."""
        return numpyro.handlers.seed(self.model, prng_key("key", key))(integer("n", n))

    def marginal_law(self, t, path: AbstractPath = OU) -> dist.Distribution:
        """p_t on `path` without argument checks (t may be a tracer); where a(t) = 0 (concrete)
        it is the pure noise law N(0, b(t)^2 I)."""
        a, b = path.a(t), path.b(t)
        a_value = concrete(a)
        if a_value is not None and a_value == 0:
            return dist.Normal(jnp.zeros(self.dim, b.dtype), b).to_event(1)
        return self.noised_law(a, b)

    def unchecked_score(self, x: Array, t, path: AbstractPath = OU) -> Array:
        """grad log p_t(x) on `path` without argument checks; t scalar or of shape x.shape[:-1]
        (exactly -x / b^2 where a(t) = 0)."""
        a, b = path.a(t), path.b(t)
        score = self.noised_score(x, a, b)
        if not path.ends_in_noise or (concrete(a) is not None and not np.any(np.asarray(a) == 0)):
            return score
        return jnp.where((jnp.asarray(a) == 0)[..., None], -x / jnp.square(b)[..., None], score)

    def _check_t(self, t, path: AbstractPath) -> None:
        path.check_time("t", t)
        if self.regime == "nonsmooth":
            try:
                check_time("t", t, positive=True)
            except ValueError as err:
                raise ValueError(
                    f"{type(self).__name__} is non-smooth: p_0 has no density, so `t` must be > 0 "
                    "(stop early at some delta > 0)"
                ) from err

    def marginal(self, t: ArrayLike, path: AbstractPath = OU) -> dist.Distribution:
        r"""$p_t$, the law of $X_t = a_t X_0 + b_t Z$ on `path` (event shape (dim,))."""
        path = as_path(path)
        self._check_t(t, path)
        return self.marginal_law(t, path)

    def score(self, x: ArrayLike, t: ArrayLike, path: AbstractPath = OU) -> Array:
        r"""$\nabla_x \log p_t(x)$ on `path` for x of shape (..., dim); returns shape (..., dim)."""
        path = as_path(path)
        self._check_t(t, path)
        check_points("x", x, self.dim)
        points = concrete(x)
        where = (
            "" if points is None else f" at points of magnitude up to {np.abs(points).max():.3g}"
        )
        return finite_or_raise(
            _score(self, jnp.asarray(x), jnp.asarray(t), path),
            f"the score is not finite{where}: beyond what float64 can evaluate for "
            f"{type(self).__name__}; use points of moderate size",
        )

    def to_spec(self) -> dict | None:
        """A plain dict (fits JSON and TOML) that `from_spec` turns back into this distribution,
        or None for a family without a registered spec (see the class docstring)."""
        if self.family is None or FAMILIES.get(self.family) is not type(self):
            return None
        return {"family": self.family} | {
            name: np.asarray(getattr(self, name), np.float64).tolist() for name in self.spec_fields
        }


@eqx.filter_jit
def _score(data: DataDistribution, x: Array, t: Array, path: AbstractPath) -> Array:
    """`data.unchecked_score` as one compiled program per shape (eagerly, each of its dozens
    of operations would compile on its own for every new shape)."""
    return data.unchecked_score(x, t, path)


def check_data(name: str, data) -> None:
    """`data` must be a `DataDistribution` (a built-in family or a subclass), else TypeError."""
    if not isinstance(data, DataDistribution):
        raise TypeError(
            f"`{name}` must be a mcm_prob.data.DataDistribution (a built-in family or your "
            f"subclass of it), got {type(data).__name__}"
        )


FAMILIES: dict[str, type[DataDistribution]] = {}


def register_family(cls: type[DataDistribution]) -> type[DataDistribution]:
    """Make `from_spec` know `cls` under `cls.family` (usable as a class decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, DataDistribution)):
        raise TypeError(f"`cls` must be a DataDistribution subclass, got {cls!r}")
    if not isinstance(cls.family, str) or not cls.family:
        raise ValueError(f"{cls.__name__}.family must be a non-empty string, got {cls.family!r}")
    FAMILIES[cls.family] = cls
    return cls


def from_spec(spec: Mapping) -> DataDistribution:
    """Rebuild a distribution from its spec: ``{"family": name, **constructor arguments}``.

    Families: ``"gaussian"`` (mean, cov; singular cov allowed), ``"gaussian_mixture"``
    (weights, means, covs), ``"dirac_mixture"`` (atoms, optional weights), ``"uniform_box"``
    (low, high), and any registered with `register_family`; or a named data set,
    ``{"dataset": "digits", "kind": "empirical" | "gaussian", ...}`` (`mcm_prob.datasets`).
    Unknown families, unknown or
    missing keys and bad values raise `ValueError` naming the key and what is accepted.
    """
    if not isinstance(spec, Mapping):
        raise TypeError(
            f"a data spec must be a dict with a 'family' key, got {type(spec).__name__}"
        )
    if "dataset" in spec and "family" not in spec:
        from .datasets import dataset_from_spec  # a named data set (mcm_prob.datasets)

        return dataset_from_spec(spec)
    family = spec.get("family")
    if not isinstance(family, str) or family not in FAMILIES:
        raise ValueError(
            f"data spec key 'family' must be one of {sorted(FAMILIES)}, got {family!r}"
        )
    cls = FAMILIES[family]
    args = {k: v for k, v in spec.items() if k != "family"}
    params = inspect.signature(cls.__init__).parameters
    required = [n for n in cls.spec_fields if params[n].default is inspect.Parameter.empty]
    unknown = sorted(set(args) - set(cls.spec_fields))
    missing = [n for n in required if n not in args]
    if unknown or missing:
        raise ValueError(
            f"data spec for family {family!r}: "
            + (f"unknown key(s) {unknown}; " if unknown else "")
            + (f"missing key(s) {missing}; " if missing else "")
            + f"accepted keys: {['family', *cls.spec_fields]}"
        )
    try:
        return cls(**args)
    except (TypeError, ValueError) as err:
        raise ValueError(f"data spec for family {family!r}: {err}") from err


# -- capabilities: what exact tools a family supports, declared by subclassing -------------------
class ClosedFormGaussian(DataDistribution):
    r"""Capability: Gaussian data $N(m, U\operatorname{diag}(\lambda)U^\top)$ with a known
    eigendecomposition. A subclass provides `mean` (d,), `eigvals` (d,) and `eigvecs` (d, d
    orthonormal columns, or None for the standard basis) besides the base's members, and gets
    the closed-form flow map, `sampler_law`, `baseline_law` and the exact-KL tools."""

    mean: eqx.AbstractVar[Array]
    eigvals: eqx.AbstractVar[Array]
    eigvecs: eqx.AbstractVar[Array | None]


class ProductData(DataDistribution):
    """Capability: independent coordinates, each a 1-d family: the sampler law is the product
    of 1-d laws and KL adds up over coordinates (`mcm_prob.gridlaw.product_kl`)."""

    @abc.abstractmethod
    def factors(self) -> list[DataDistribution]:
        """The 1-d factor of each coordinate (equal coordinates may share one object, so that
        their grid law is computed once)."""


class ClosedFormCDF(DataDistribution):
    """Capability (1-d families): the CDF of a X_0 + b Z in closed form, which the grid laws
    use without ODE solves (`mcm_prob.gridlaw.grid_kl_cdf`, schedule optimisation)."""

    @abc.abstractmethod
    def noised_log_cdfs(self, x: Array, a, b) -> tuple[Array, Array]:
        """(log F(x), log(1 - F(x))) of the law of a X_0 + b Z, x of shape (n,); both tails in
        log space, differentiable in x, a and b. Raises ValueError when dim != 1."""


def _one_dimensional(data: DataDistribution) -> None:
    if data.dim != 1:
        raise ValueError(f"no closed-form CDF for {type(data).__name__} with dim {data.dim}")


def _normal_mixture_log_cdfs(x, a, b, w, m, v):
    r"""Normal mixture $\sum_k w_k \Phi((x - a m_k)/(a^2 v_k + b^2)^{1/2})$, both tails in logs."""
    z = (x[:, None] - a * m) / jnp.sqrt(a**2 * v + b**2)
    return (
        logsumexp(jnp.log(w) + log_ndtr(z), axis=1),
        logsumexp(jnp.log(w) + log_ndtr(-z), axis=1),
    )


def _log_psi(z):
    r"""$\log\Psi(z)$, $\Psi(z) = z\Phi(z) + \varphi(z)$ (the antiderivative of $\Phi$): for
    z <= 0 as $\log\varphi(z) + \log(1 + zR(z))$ with the Mills ratio R = Phi/phi (relative
    error about 1e-16 z^2), for z > 0 through $\Psi(z) = z + \Psi(-z)$."""
    zn = -jnp.abs(z)
    log_phi = -0.5 * zn**2 - 0.5 * _LOG_2PI
    neg = log_phi + jnp.log1p(zn * jnp.exp(log_ndtr(zn) - log_phi))
    pos = jnp.logaddexp(jnp.log(jnp.maximum(jnp.abs(z), 1e-300)), neg)
    return jnp.where(z > 0, pos, neg)


@register_family
class Gaussian(ClosedFormGaussian, ClosedFormCDF):
    r"""$N(m, \Sigma)$ with $\Sigma$ symmetric PSD. Smooth when $\Sigma$ is PD, non-smooth when
    singular (then $p_0$ lives on an affine subspace and only t > 0 has a density).

    Exact: $a X_0 + b Z \sim N(a m, a^2 \Sigma + b^2 I)$, so on a path
    $p_t = N(a_t m, \Sigma_t)$, $\Sigma_t = a_t^2\Sigma + b_t^2 I$, and
    $\nabla \log p_t(x) = -\Sigma_t^{-1}(x - a_t m)$.

    Two constructions: `Gaussian(mean, cov)` (eigendecomposition computed once), or, at image
    scale, `Gaussian(eigvals=lam, eigvecs=U, mean=m)` with $\Sigma = U \operatorname{diag}(\lambda)
    U^\top$ given (`eigvecs` omitted: the standard basis, no d x d array is ever formed, and
    every exact law the package computes runs per eigenvalue in O(K d)).
    """

    mean: Array
    eigvals: Array
    eigvecs: Array | None  # None: the standard basis
    factor: Array | None  # Cholesky factor of cov (smooth) or eigvecs * sqrt(eigvals) (singular)
    given_cov: Array | None  # the covariance as given (None for the eigenvalue construction)
    regime: str = eqx.field(static=True)
    family = "gaussian"
    spec_fields = ("mean", "cov", "eigvals", "eigvecs")

    def __init__(
        self,
        mean: ArrayLike | None = None,
        cov: ArrayLike | None = None,
        *,
        eigvals: ArrayLike | None = None,
        eigvecs: ArrayLike | None = None,
    ):
        if cov is None and eigvals is None:
            raise ValueError("needs `cov` or `eigvals` (optionally with `eigvecs`)")
        if cov is not None and eigvals is not None:
            raise ValueError("pass either `cov` or `eigvals`, not both")
        if cov is not None:
            if eigvecs is not None:
                raise ValueError("`eigvecs` goes with `eigvals`, not with `cov`")
            if mean is None:
                raise ValueError("`mean` is required with `cov`")
            m = real_array("mean", mean, ndim=1)
            c = real_array("cov", cov, ndim=2)
            if c.shape != (m.size, m.size):
                raise ValueError(
                    f"`cov` must have shape ({m.size}, {m.size}) to match `mean`, got {c.shape}"
                )
            if m.size == 0:
                raise ValueError("`mean` must be non-empty")
            lam, vecs = _eigh_psd("cov", c)
            regime = "smooth" if np.all(lam > 0) else "nonsmooth"
            self.factor = jnp.asarray(_x0_factor(c, lam, vecs, regime))
            self.given_cov = jnp.asarray(c)
        else:
            lam = real_array("eigvals", eigvals, ndim=1)
            if lam.size == 0 or np.any(lam < 0):
                raise ValueError("`eigvals` must be non-empty and >= 0")
            m = np.zeros(lam.size) if mean is None else real_array("mean", mean, ndim=1)
            if m.shape != lam.shape:
                raise ValueError(
                    f"`mean` must have shape {lam.shape} to match `eigvals`, got {m.shape}"
                )
            vecs = None
            if eigvecs is not None:
                vecs = real_array("eigvecs", eigvecs, ndim=2)
                if vecs.shape != (lam.size, lam.size):
                    raise ValueError(
                        f"`eigvecs` must have shape ({lam.size}, {lam.size}), got {vecs.shape}"
                    )
                if not np.allclose(vecs.T @ vecs, np.eye(lam.size), atol=1e-10):
                    raise ValueError("`eigvecs` must be orthonormal (its columns the eigenvectors)")
            regime = "smooth" if np.all(lam > 0) else "nonsmooth"
            self.factor = self.given_cov = None
        self.mean, self.eigvals = jnp.asarray(m), jnp.asarray(lam)
        self.eigvecs = None if vecs is None else jnp.asarray(vecs)
        self.regime = regime

    @classmethod
    def fit(cls, x: ArrayLike, *, min_eigenvalue: float = 0.0) -> Gaussian:
        r"""The Gaussian with the sample mean and covariance of x, shape (n, dim), n >= 2:
        $\hat\Sigma = \frac{1}{n-1}\sum_i (x_i - \bar x)(x_i - \bar x)^\top$ (`numpy.cov`),
        built in the eigenvalue form. Eigenvalues below `min_eigenvalue` are raised to it (> 0
        makes a rank-deficient fit, e.g. images with constant pixels, smooth); with 0 the
        numerically zero ones are exactly 0 and the fit is non-smooth."""
        x = real_array("x", x, ndim=2)
        if x.shape[0] < 2 or x.shape[1] == 0:
            raise ValueError(f"`x` must have shape (n, dim) with n >= 2, dim >= 1, got {x.shape}")
        floor = number("min_eigenvalue", min_eigenvalue, ge=0)
        lam, vecs = _eigh_psd(
            "the sample covariance", np.cov(x, rowvar=False).reshape(x.shape[1], -1)
        )
        return cls(x.mean(0), eigvals=np.maximum(lam, floor), eigvecs=vecs)

    @property
    def dim(self) -> int:
        return self.mean.shape[-1]

    @property
    def cov(self) -> Array:
        """The covariance, shape (dim, dim) (formed on demand for the eigenvalue construction)."""
        if self.given_cov is not None:
            return self.given_cov
        if self.eigvecs is None:
            return jnp.diag(self.eigvals)
        return (self.eigvecs * self.eigvals) @ self.eigvecs.T

    def data_law(self):
        if self.factor is None:
            if self.eigvecs is None:
                return dist.Normal(self.mean, jnp.sqrt(self.eigvals)).to_event(1)
            return DegenerateNormal(self.mean, self.eigvecs * jnp.sqrt(self.eigvals))
        if self.regime == "smooth":
            return dist.MultivariateNormal(self.mean, scale_tril=self.factor)
        return DegenerateNormal(self.mean, self.factor)

    def cov_t(self, t: ArrayLike, path: AbstractPath = OU) -> Array:
        r"""$\Sigma_t = a_t^2\Sigma + b_t^2 I$ on `path`, shape (dim, dim)."""
        vecs = jnp.eye(self.dim) if self.eigvecs is None else self.eigvecs
        return _cov_ab(path.a(t), path.b(t), self.eigvals, vecs)

    def noised_log_cdfs(self, x, a, b):
        _one_dimensional(self)
        return _normal_mixture_log_cdfs(x, a, b, jnp.ones(1), self.mean, self.eigvals)

    def noised_law(self, a, b):
        if self.factor is None:  # the eigenvalue construction: O(d) per eigenvalue
            coef = self.mean if self.eigvecs is None else self.mean @ self.eigvecs
            return EigenNormal(a * coef, a**2 * self.eigvals + b**2, self.eigvecs)
        cov = _cov_ab(a, b, self.eigvals, self.eigvecs)
        return dist.MultivariateNormal(a * self.mean, scale_tril=jnp.linalg.cholesky(cov))

    def noised_score(self, x, a, b):
        vecs = None if self.eigvecs is None else self.eigvecs[None]
        _, score = _mixture_terms(x, a, b, self.mean[None], self.eigvals[None], vecs)
        return score[..., 0, :]

    def to_spec(self) -> dict:
        out = {"family": "gaussian", "mean": np.asarray(self.mean, np.float64).tolist()}
        if self.factor is not None:
            return out | {"cov": np.asarray(self.cov, np.float64).tolist()}
        out["eigvals"] = np.asarray(self.eigvals, np.float64).tolist()
        if self.eigvecs is not None:
            out["eigvecs"] = np.asarray(self.eigvecs, np.float64).tolist()
        return out


@register_family
class GaussianMixture(ClosedFormCDF):
    r"""$\sum_k w_k N(\mu_k, \Sigma_k)$; smooth when every $\Sigma_k$ is PD.

    Exact: $p_t = \sum_k w_k N(a_t\mu_k, \Sigma_{k,t})$, $\Sigma_{k,t} = a_t^2\Sigma_k + b_t^2 I$, and
    $\nabla\log p_t = \sum_k r_k(x)\,(-\Sigma_{k,t}^{-1}(x - a_t\mu_k))$ with responsibilities
    $r_k = \operatorname{softmax}_k(\log w_k + \log N_k(x))$ (log-sum-exp arithmetic).
    """

    weights: Array
    means: Array
    covs: Array
    eigvals: Array
    eigvecs: Array
    factors: Array  # per component, as `Gaussian.factor`
    regime: str = eqx.field(static=True)
    family = "gaussian_mixture"
    spec_fields = ("weights", "means", "covs")

    def __init__(self, weights: ArrayLike, means: ArrayLike, covs: ArrayLike):
        mu = real_array("means", means, ndim=2)
        c = real_array("covs", covs, ndim=3)
        k, d = mu.shape
        if d == 0:
            raise ValueError("`means` must have a non-empty data dimension")
        if c.shape != (k, d, d):
            raise ValueError(
                f"`covs` must have shape ({k}, {d}, {d}) to match `means`, got {c.shape}"
            )
        w = _weights(weights, k)
        lam, vecs = zip(*(_eigh_psd(f"covs[{i}]", ci) for i, ci in enumerate(c)), strict=True)
        lam = np.stack(lam)
        self.weights, self.means, self.covs = jnp.asarray(w), jnp.asarray(mu), jnp.asarray(c)
        self.eigvals, self.eigvecs = jnp.asarray(lam), jnp.asarray(np.stack(vecs))
        self.regime = "smooth" if np.all(lam > 0) else "nonsmooth"
        self.factors = jnp.asarray(
            np.stack([_x0_factor(*args, self.regime) for args in zip(c, lam, vecs, strict=True)])
        )

    @property
    def dim(self) -> int:
        return self.means.shape[-1]

    def data_law(self):
        if self.regime == "smooth":
            comp = dist.MultivariateNormal(self.means, scale_tril=self.factors)
        else:
            comp = DegenerateNormal(self.means, self.factors)
        return dist.MixtureSameFamily(dist.Categorical(probs=self.weights), comp)

    def noised_log_cdfs(self, x, a, b):
        _one_dimensional(self)
        return _normal_mixture_log_cdfs(x, a, b, self.weights, self.means[:, 0], self.covs[:, 0, 0])

    def noised_law(self, a, b):
        tril = jnp.linalg.cholesky(_cov_ab(a, b, self.eigvals, self.eigvecs))
        comp = dist.MultivariateNormal(a * self.means, scale_tril=tril)
        return dist.MixtureSameFamily(dist.Categorical(probs=self.weights), comp)

    def noised_score(self, x, a, b):
        return _mixture_score(
            x, a, b, jnp.log(self.weights), self.means, self.eigvals, self.eigvecs
        )


@register_family
class DiracMixture(ClosedFormCDF):
    r"""$\sum_k w_k \delta_{a_k}$ (an empirical measure for equal weights); always non-smooth.

    Exact: $p_t = \sum_k w_k N(a_t x_k, b_t^2 I)$ for t > 0 (atoms $x_k$); the score is the
    responsibility-weighted $-(x - a_t x_k)/b_t^2$, evaluated with log-sum-exp so that
    small t (e.g. 1e-4) gives finite values.
    """

    atoms: Array
    weights: Array
    regime: str = eqx.field(static=True)
    family = "dirac_mixture"
    spec_fields = ("atoms", "weights")

    def __init__(self, atoms: ArrayLike, weights: ArrayLike | None = None):
        a = real_array("atoms", atoms, ndim=2)
        k, d = a.shape
        if k == 0 or d == 0:
            raise ValueError(f"`atoms` must have shape (K, dim) with K, dim >= 1, got {a.shape}")
        w = np.full(k, 1.0 / k) if weights is None else _weights(weights, k)
        self.atoms, self.weights = jnp.asarray(a), jnp.asarray(w)
        self.regime = "nonsmooth"

    @property
    def dim(self) -> int:
        return self.atoms.shape[-1]

    def data_law(self):
        return Atoms(self.atoms, self.weights)

    def noised_log_cdfs(self, x, a, b):
        _one_dimensional(self)
        zeros = jnp.zeros_like(self.weights)
        return _normal_mixture_log_cdfs(x, a, b, self.weights, self.atoms[:, 0], zeros)

    def noised_law(self, a, b):
        # MultivariateNormal components: NumPyro's mixtures need a parameter-free support
        tril = b * jnp.eye(self.dim, dtype=self.atoms.dtype)
        comp = dist.MultivariateNormal(a * self.atoms, scale_tril=tril)
        return dist.MixtureSameFamily(dist.Categorical(probs=self.weights), comp)

    def noised_score(self, x, a, b):
        if self.atoms.shape[0] <= _GRAM_ATOMS:
            zeros = jnp.zeros_like(self.atoms)
            return _mixture_score(x, a, b, jnp.log(self.weights), self.atoms, zeros, None)
        # many atoms (an empirical measure): |x - a x_k|^2 = |x|^2 - 2a x.x_k + a^2 |x_k|^2,
        # whose first term cancels in the softmax: two (n, K) x (K, d) products, no (n, K, d)
        # array (float64 error in the logits ~ eps |x|^2 / b^2)
        a, b = jnp.asarray(a)[..., None], jnp.asarray(b)[..., None]
        logits = (
            jnp.log(self.weights)
            + (a * (x @ self.atoms.T) - 0.5 * a**2 * jnp.sum(self.atoms**2, -1)) / b**2
        )
        resp = jax.nn.softmax(logits, axis=-1)
        return (a * (resp @ self.atoms) - x) / b**2

    @classmethod
    def from_samples(cls, x: ArrayLike) -> DiracMixture:
        r"""The empirical measure $\frac1n\sum_i \delta_{x_i}$ of samples x, shape (n, dim) (a
        training set: its exact flow returns training points, the memorising limit)."""
        return cls(real_array("x", x, ndim=2))


@register_family
class UniformBox(ProductData, ClosedFormCDF):
    r"""Uniform on the box $\prod_i [l_i, h_i]$; non-smooth (the density jumps at the faces).

    $p_t$ is a product of 1-d laws `NoisyUniform` of $a_t U + b_t Z$, with density
    $\big(\Phi(\tfrac{x - a_t l}{b_t}) - \Phi(\tfrac{x - a_t h}{b_t})\big) /
    (a_t (h - l))$, evaluated in log space (see `NoisyUniform`).
    """

    low: Array
    high: Array
    regime: str = eqx.field(static=True)
    family = "uniform_box"
    spec_fields = ("low", "high")

    def __init__(self, low: ArrayLike, high: ArrayLike):
        lo = real_array("low", low, ndim=1)
        hi = real_array("high", high, ndim=1)
        if lo.shape != hi.shape or lo.size == 0:
            raise ValueError(
                f"`low` and `high` must be non-empty with equal shapes, got {lo.shape}, {hi.shape}"
            )
        if np.any(lo >= hi):
            raise ValueError("need `low` < `high` in every coordinate")
        self.low, self.high = jnp.asarray(lo), jnp.asarray(hi)
        self.regime = "nonsmooth"

    @property
    def dim(self) -> int:
        return self.low.shape[-1]

    def data_law(self):
        return dist.Uniform(self.low, self.high).to_event(1)

    def factors(self) -> list[UniformBox]:
        """`UniformBox([low_i], [high_i])` for each coordinate; equal coordinates share one."""
        bounds = list(
            zip(np.asarray(self.low).tolist(), np.asarray(self.high).tolist(), strict=True)
        )
        made = {bd: UniformBox([bd[0]], [bd[1]]) for bd in set(bounds)}
        return [made[bd] for bd in bounds]

    def noised_log_cdfs(self, x, a, b):
        r"""$(\Psi(u) - \Psi(v))/(u - v)$ with $u = (x - a l)/b$, $v = (x - a h)/b$."""
        _one_dimensional(self)
        lo, hi = self.low[0], self.high[0]
        u, v = (x - a * lo) / b, (x - a * hi) / b
        log_width = jnp.log(a * (hi - lo) / b)

        def log_diff(p, q):  # log(Psi(p) - Psi(q)), p > q
            lp, lq = _log_psi(p), _log_psi(q)
            return lp + jnp.log(-jnp.expm1(jnp.minimum(lq - lp, -1e-300)))

        return log_diff(u, v) - log_width, log_diff(-v, -u) - log_width

    def noised_law(self, a, b):
        return NoisyUniform(self.low, self.high, a, b).to_event(1)

    def noised_score(self, x, a, b):
        a, b = jnp.asarray(a)[..., None], jnp.asarray(b)[..., None]
        return NoisyUniform(self.low, self.high, a, b).score(x)


def _log1mexp(u: Array) -> Array:
    """log(1 - exp(u)) for u < 0, accurate on both sides of -log 2."""
    return jnp.where(u > -np.log(2.0), jnp.log(-jnp.expm1(u)), jnp.log1p(-jnp.exp(u)))


def _log_phi(z: Array) -> Array:
    return -0.5 * z**2 - 0.5 * _LOG_2PI


def _log_ndtr_diff(a: Array, w: Array) -> Array:
    r"""$\log(\Phi(a) - \Phi(a - w))$ for w > 0, stable in both tails and for tiny w.

    The width w is passed, not recomputed as a difference (which would lose its digits for tiny
    w). Reflects to the lower tail ($\Phi(a)-\Phi(b) = \Phi(-b)-\Phi(-a)$ when a + b > 0); for
    w < 1e-3 uses the midpoint expansion
    $w\,\varphi(m)\,(1 + w^2(m^2-1)/24 + w^4(m^4-6m^2+3)/1920)$, relative error O(w^6 m^6).
    """
    b = a - w
    flip = a + b > 0
    hi, lo = jnp.where(flip, -b, a), jnp.where(flip, -a, b)
    la, lb = log_ndtr(hi), log_ndtr(lo)
    direct = la + _log1mexp(jnp.minimum(lb - la, -jnp.finfo(la.dtype).tiny))
    m, ws = a - 0.5 * w, jnp.minimum(w, 1e-3)
    series = (
        jnp.log(ws)
        + _log_phi(m)
        + jnp.log1p(ws**2 * (m**2 - 1) / 24 + ws**4 * (m**4 - 6 * m**2 + 3) / 1920)
    )
    return jnp.where(w < 1e-3, series, direct)


class NoisyUniform(dist.Distribution):
    r"""Law of $\alpha U + \sigma Z$ with $U \sim \mathrm{Uniform}(l, h)$, $Z \sim N(0, 1)$
    (elementwise; $\alpha, \sigma > 0$). This is the marginal of a uniform coordinate on a path.

    log-density: $\log(\Phi(a) - \Phi(b)) - \log(\alpha (h - l))$ with $a = (x - \alpha l)/\sigma$,
    $b = (x - \alpha h)/\sigma$. Score: $(\varphi(a) - \varphi(b)) / (\sigma(\Phi(a) - \Phi(b)))$,
    where $\varphi(a) - \varphi(b)$ is formed as $-\varphi(a)\,\mathrm{expm1}(c)$ or
    $\varphi(b)\,\mathrm{expm1}(-c)$, $c = (a - b)(a + b)/2$, $a - b = \alpha(h-l)/\sigma$, so that
    neither cancellation nor overflow occurs.
    """

    arg_constraints = {
        "low": constraints.real,
        "high": constraints.real,
        "scale": constraints.positive,
        "noise": constraints.positive,
    }
    support = constraints.real
    reparametrized_params = ["low", "high", "scale", "noise"]

    def __init__(self, low, high, scale, noise, *, validate_args=None):
        self.low, self.high, self.scale, self.noise = jnp.broadcast_arrays(
            *(jnp.asarray(v) for v in (low, high, scale, noise))
        )
        super().__init__(batch_shape=jnp.shape(self.low), validate_args=validate_args)

    def sample(self, key, sample_shape=()):
        k1, k2 = jax.random.split(key)
        shape = sample_shape + self.batch_shape
        u = jax.random.uniform(k1, shape, minval=self.low, maxval=self.high)
        return self.scale * u + self.noise * jax.random.normal(k2, shape)

    def _aw(self, x):
        a = (x - self.scale * self.low) / self.noise
        return a, self.scale * (self.high - self.low) / self.noise

    def log_prob(self, value):
        a, w = self._aw(value)
        return _log_ndtr_diff(a, w) - jnp.log(self.scale * (self.high - self.low))

    def score(self, value) -> Array:
        """d/dx log density, elementwise."""
        a, w = self._aw(value)
        m = a - 0.5 * w  # (a + b) / 2
        c = w * m
        left = c <= 0
        log_piv = _log_phi(jnp.where(left, a, a - w)) - _log_ndtr_diff(a, w)
        # where, not minimum/maximum: those split the derivative at the tie c = 0 (the centre)
        factor = jnp.where(
            left, -jnp.expm1(jnp.where(left, c, 0.0)), jnp.expm1(-jnp.where(left, 0.0, c))
        )
        return jnp.exp(log_piv) * factor / self.noise

    @property
    def mean(self):
        return 0.5 * self.scale * (self.low + self.high)

    @property
    def variance(self):
        return (self.scale * (self.high - self.low)) ** 2 / 12 + self.noise**2


class Atoms(dist.Distribution):
    r"""$\sum_k w_k \delta_{a_k}$ on $R^d$ (atoms (K, d), weights (K,)): `sample` picks atoms;
    `log_prob` is $\log \sum_{k: a_k = x} w_k$ (the mass at x), -inf off the atoms."""

    arg_constraints = {"weights": constraints.simplex}
    support = constraints.real_vector

    def __init__(self, atoms, weights, *, validate_args=None):
        self.atoms, self.weights = jnp.asarray(atoms), jnp.asarray(weights)
        super().__init__(event_shape=self.atoms.shape[-1:], validate_args=validate_args)

    def sample(self, key, sample_shape=()):
        idx = jax.random.categorical(key, jnp.log(self.weights), shape=sample_shape)
        return self.atoms[idx]

    def log_prob(self, value):
        hit = jnp.all(value[..., None, :] == self.atoms, axis=-1)
        return logsumexp(jnp.where(hit, jnp.log(self.weights), -jnp.inf), axis=-1)

    @property
    def mean(self):
        return self.weights @ self.atoms


class DegenerateNormal(dist.Distribution):
    r"""$N(m, F F^\top)$ for a (possibly rank-deficient) factor F of shape (..., d, r): the
    law of $m + F\,\varepsilon$, $\varepsilon \sim N(0, I_r)$.

    Used as the t = 0 law of Gaussians with singular covariance, which have no Lebesgue density:
    `log_prob` is the density on the support (w.r.t. Lebesgue measure on the span of F's
    non-zero columns) for points on it and -inf off it (relative tolerance 1e-8).
    """

    arg_constraints = {"loc": constraints.real_vector}
    support = constraints.real_vector
    reparametrized_params = ["loc"]

    def __init__(self, loc, factor, *, validate_args=None):
        self.loc, self.factor = jnp.asarray(loc), jnp.asarray(factor)
        batch = jnp.broadcast_shapes(self.loc.shape[:-1], self.factor.shape[:-2])
        super().__init__(
            batch_shape=batch, event_shape=self.loc.shape[-1:], validate_args=validate_args
        )

    def sample(self, key, sample_shape=()):
        eps = jax.random.normal(key, sample_shape + self.batch_shape + self.factor.shape[-1:])
        return self.loc + jnp.einsum("...ij,...j->...i", self.factor, eps)

    def log_prob(self, value):
        col_norm = jnp.linalg.norm(self.factor, axis=-2)  # (..., r): sqrt of eigenvalues
        active = col_norm > 0
        safe = jnp.where(active, col_norm, 1.0)
        basis = self.factor / safe[..., None, :]
        diff = value - self.loc
        coef = jnp.einsum("...ij,...i->...j", basis, diff) * active
        resid = diff - jnp.einsum("...ij,...j->...i", basis, coef)
        z = coef / safe
        r = jnp.sum(active, -1)
        logp = -0.5 * jnp.sum(z**2, -1) - jnp.sum(jnp.log(safe), -1) - 0.5 * r * _LOG_2PI
        scale = jnp.maximum(jnp.max(col_norm, -1), 1.0)
        on_support = jnp.linalg.norm(resid, axis=-1) <= 1e-8 * scale
        return jnp.where(on_support, logp, -jnp.inf)

    @property
    def mean(self):
        return jnp.broadcast_to(self.loc, self.batch_shape + self.event_shape)

    @property
    def covariance_matrix(self):
        return jnp.einsum("...ij,...kj->...ik", self.factor, self.factor)


class EigenNormal(dist.MultivariateNormal):
    r"""$N(U c, U \operatorname{diag}(v) U^\top)$: `coef` c (d,), `var` v (d,) > 0, `basis` U
    (d, d) orthonormal or None (the standard basis). A `MultivariateNormal` (dense parts on
    demand) whose mean, variance, sampling and log density cost O(d) (O(d^2) with a basis)."""

    def __init__(self, coef, var, basis=None, *, validate_args=None):
        self.coef, self.var = jnp.asarray(coef), jnp.asarray(var)
        self.basis = None if basis is None else jnp.asarray(basis)
        dist.Distribution.__init__(
            self, batch_shape=(), event_shape=self.coef.shape[-1:], validate_args=validate_args
        )

    def _to_basis(self, z):
        return z if self.basis is None else z @ self.basis.T

    def _from_basis(self, x):
        return x if self.basis is None else x @ self.basis

    @lazy_property
    def loc(self):
        return self._to_basis(self.coef)

    @property
    def mean(self):
        return self.loc

    @lazy_property
    def covariance_matrix(self):
        if self.basis is None:
            return jnp.diag(self.var)
        return (self.basis * self.var) @ self.basis.T

    @lazy_property
    def scale_tril(self):
        return jnp.linalg.cholesky(self.covariance_matrix)

    @lazy_property
    def precision_matrix(self):
        if self.basis is None:
            return jnp.diag(1.0 / self.var)
        return (self.basis / self.var) @ self.basis.T

    @property
    def variance(self):
        if self.basis is None:
            return self.var
        return jnp.sum(self.basis**2 * self.var, -1)

    def sample(self, key, sample_shape=()):
        eps = jax.random.normal(key, sample_shape + self.coef.shape, self.coef.dtype)
        return self._to_basis(self.coef + jnp.sqrt(self.var) * eps)

    def log_prob(self, value):
        z = self._from_basis(jnp.asarray(value)) - self.coef
        return -0.5 * jnp.sum(z**2 / self.var + jnp.log(2 * jnp.pi * self.var), -1)

    def tree_flatten(self):
        return (self.coef, self.var, self.basis), None

    @classmethod
    def tree_unflatten(cls, aux_data, params):
        return cls(*params)


MAX_STORED_NUMBERS = 100_000  # a user family's fields are stored up to this many numbers


def _sha256(data: DataDistribution) -> str:
    h = hashlib.sha256(str(jax.tree_util.tree_structure(data)).encode())
    for leaf in jax.tree_util.tree_leaves(data):
        arr = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{arr.dtype}{arr.shape}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def _stored_fields(data: DataDistribution) -> tuple[dict | None, str]:
    """The dataclass fields of a user family as JSON (arrays with their dtype), or None and
    why they cannot be stored."""
    fields, numbers = {}, 0
    for f in dataclasses.fields(data):
        value = getattr(data, f.name)
        if value is None or isinstance(value, (bool, int, float, str)):
            if isinstance(value, float) and not np.isfinite(value):
                return None, f"field {f.name!r} is not finite"
            fields[f.name] = value
        elif isinstance(value, (jax.Array, np.ndarray)) and value.dtype.kind in "biuf":
            arr = np.asarray(value)
            if not np.all(np.isfinite(arr)):
                return None, f"field {f.name!r} has non-finite values"
            numbers += arr.size
            fields[f.name] = {"array": arr.tolist(), "dtype": str(arr.dtype)}
        else:
            return None, f"field {f.name!r} is a {type(value).__name__}, not an array or number"
    if numbers > MAX_STORED_NUMBERS:
        return None, f"its arrays hold {numbers} numbers (more than {MAX_STORED_NUMBERS})"
    return fields, ""


def describe(data: DataDistribution) -> dict:
    """What a results file or saved model records about a distribution: its spec when it has
    one, else ``{"class": module path, "repr": repr, "sha256": hash of its tree structure and
    arrays, "fields": its dataclass fields as JSON}`` (``"fields"`` replaced by
    ``"not_stored"``, the reason, when a field is not an array, number or string or the arrays
    are larger than `MAX_STORED_NUMBERS`). `rebuild` turns either back into the distribution."""
    spec = data.to_spec()
    if spec is not None:
        return spec
    cls = type(data)
    out = {"class": f"{cls.__module__}.{cls.__qualname__}", "repr": repr(data)}
    out["sha256"] = _sha256(data)
    fields, why = _stored_fields(data)
    return out | ({"fields": fields} if fields is not None else {"not_stored": why})


def rebuild(description: Mapping) -> DataDistribution:
    """The distribution that `describe` recorded: a spec through `from_spec`; a user family
    from its stored fields, when its class is defined in this process (its module imported,
    or the notebook cell run: nothing is imported on a file's say-so) and its arrays hash to
    the recorded value. Otherwise `ValueError` saying what is missing."""
    if not isinstance(description, Mapping):
        raise TypeError(f"`description` must be a dict, got {type(description).__name__}")
    if "family" in description or "dataset" in description:
        return from_spec(description)
    name = description.get("class")
    if not isinstance(name, str) or "." not in name:
        raise ValueError(f"no data spec or class path in {sorted(description)}")
    if "fields" not in description:
        why = description.get("not_stored", "no fields were stored")
        raise ValueError(f"the data ({name}) cannot be rebuilt from the file: {why}")
    module_name, _, qualname = name.rpartition(".")
    while module_name not in sys.modules and "." in module_name:  # nested classes
        module_name, _, outer = module_name.rpartition(".")
        qualname = f"{outer}.{qualname}"
    module = sys.modules.get(module_name)
    cls = module
    for part in qualname.split("."):
        cls = getattr(cls, part, None)
    if module is None or not (isinstance(cls, type) and issubclass(cls, DataDistribution)):
        raise ValueError(
            f"the data's class {name} is not defined in this process: import its module (or "
            "run the cell that defines it) first"
        )
    stored = description["fields"]
    names = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(stored, Mapping) or sorted(stored) != sorted(names):
        raise ValueError(f"{name} now has the fields {names}, the file {sorted(stored)}")
    obj = object.__new__(cls)
    for key in names:
        value = stored[key]
        if isinstance(value, Mapping):
            value = jnp.asarray(np.asarray(value["array"], dtype=value["dtype"]))
        object.__setattr__(obj, key, value)
    if _sha256(obj) != description.get("sha256"):
        raise ValueError(f"{name} rebuilt from the file does not hash to the recorded value")
    return obj
