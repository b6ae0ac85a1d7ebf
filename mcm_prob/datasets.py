r"""Real data with exact ground truth: named data sets as empirical measures or fitted Gaussians.

A data set gives both regimes at its own dimension: the **empirical measure**
$\frac1n\sum_i \delta_{x_i}$ of its images (non-smooth; its exact flow returns training images,
the memorising limit) and the **fitted Gaussian** $N(\bar x, \hat\Sigma)$ (smooth; a real
spectrum), both exact on every path. The distributions returned are a `DiracMixture` and a
`Gaussian` whose spec names the data set (``{"dataset": "digits", "kind": ..., "sha256": ...}``)
instead of holding its numbers, so a results file rebuilds the data on another machine and the
hash checks that it is the same data.

`digits` needs scikit-learn (the optional extra ``mcm_prob[datasets]``), which ships the images
inside the package: nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Mapping

import equinox as eqx
import numpy as np

from ._checks import integer, number, one_of
from .data import DataDistribution, DiracMixture, Gaussian

__all__ = [
    "digits",
    "digits_array",
    "image_shape",
    "DATASETS",
    "NamedDiracMixture",
    "NamedGaussian",
]

DIGITS_MIN_EIGENVALUE = 1e-4


class NamedDiracMixture(DiracMixture):
    """A `DiracMixture` built from a named data set: its spec names the set (see the module)."""

    source: str = eqx.field(static=True)  # the spec, as JSON
    image_shape: tuple[int, ...] | None = eqx.field(static=True)

    def __init__(self, atoms, *, source: Mapping, image_shape=None):
        super().__init__(atoms)
        self.source, self.image_shape = json.dumps(dict(source)), image_shape

    def to_spec(self) -> dict:
        return json.loads(self.source)


class NamedGaussian(Gaussian):
    """A `Gaussian` fitted to a named data set: its spec names the set (see the module)."""

    source: str = eqx.field(static=True)
    image_shape: tuple[int, ...] | None = eqx.field(static=True)

    def __init__(self, fitted: Gaussian, *, source: Mapping, image_shape=None):
        super().__init__(fitted.mean, eigvals=fitted.eigvals, eigvecs=fitted.eigvecs)
        self.source, self.image_shape = json.dumps(dict(source)), image_shape

    def to_spec(self) -> dict:
        return json.loads(self.source)


def image_shape(data: DataDistribution) -> tuple[int, ...] | None:
    """The (height, width) of the images a distribution's points are, or None (not images)."""
    return getattr(data, "image_shape", None)


def _digits_grey_levels(sha256: str | None) -> tuple[np.ndarray, str]:
    """scikit-learn's digits as grey levels (1797, 64) and their SHA-256, checked if given."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError(
            "mcm_prob.datasets.digits needs scikit-learn, which ships the digits images: "
            "pip install 'mcm_prob[datasets]' (or pip install scikit-learn)"
        ) from err
    raw = np.ascontiguousarray(load_digits().data, np.float64)
    digest = hashlib.sha256(raw.tobytes()).hexdigest()
    if sha256 is not None and sha256 != digest:
        raise ValueError(
            f"`sha256`: the digits on this machine hash to {digest}, not {sha256}: this "
            "scikit-learn ships other data than the one the spec was made with"
        )
    return raw, digest


def digits_array(scale: float = 1.0, *, sha256: str | None = None) -> np.ndarray:
    r"""The 1,797 8x8 digits of scikit-learn as rows of 64 pixels in $[-s, s]$ (s = `scale`):
    $x = s\,(p/8 - 1)$ for grey levels p = 0..16; shape (1797, 64), float64, in
    scikit-learn's order. With `sha256`, the raw grey levels must hash to it (ValueError
    otherwise: this machine's copy is not the data a file was made with)."""
    s = number("scale", scale, gt=0)
    return s * (_digits_grey_levels(sha256)[0] / 8.0 - 1.0)


def digits(
    kind: str = "empirical",
    scale: float = 1.0,
    *,
    train: int | None = None,
    min_eigenvalue: float = DIGITS_MIN_EIGENVALUE,
    sha256: str | None = None,
) -> NamedDiracMixture | NamedGaussian:
    r"""The digits (`digits_array`, d = 64) as data with exact ground truth.

    - `kind`: ``"empirical"``, the empirical measure of the images (a `DiracMixture` of 1,797
      atoms, non-smooth), or ``"gaussian"``, their fitted Gaussian (`Gaussian.fit`, smooth).
    - `scale`: pixels in [-scale, scale].
    - `train`: use only the first `train` images (the rest held out, e.g. for the memorisation
      measure `mcm_prob.metrics.memorisation`); default all.
    - `min_eigenvalue` (``"gaussian"``): floor of the fitted covariance's eigenvalues, relative
      to scale^2. Three pixels are always 0, so the sample covariance is singular; the default
      1e-4 (a pixel noise of 0.01 of the range's half-width, about a tenth of a grey level)
      makes the fit smooth and changes the covariance by at most that (the eigenvalues of the
      sample covariance run from 2.8 down to 6e-6 at scale 1 before the zeros).
    - `sha256`: check that this machine's images are the ones a stored spec was made with.

    The result's `to_spec()` names the set; `mcm_prob.data.from_spec` rebuilds it.
    """
    one_of("kind", kind, ("empirical", "gaussian"))
    s = number("scale", scale, gt=0)
    raw, digest = _digits_grey_levels(sha256)
    x = s * (raw / 8.0 - 1.0)
    n = x.shape[0] if train is None else integer("train", train, ge=2)
    if n > x.shape[0]:
        raise ValueError(f"`train` must be <= {x.shape[0]} (the number of digits), got {n}")
    spec = {"dataset": "digits", "kind": kind, "scale": s}
    spec |= {} if train is None else {"train": n}
    spec["sha256"] = digest
    if kind == "empirical":
        return NamedDiracMixture(x[:n], source=spec, image_shape=(8, 8))
    floor = number("min_eigenvalue", min_eigenvalue, ge=0)
    fitted = Gaussian.fit(x[:n], min_eigenvalue=floor * s**2)
    spec = spec | {"min_eigenvalue": floor}
    return NamedGaussian(fitted, source=spec, image_shape=(8, 8))


DATASETS: dict = {"digits": digits}


def dataset_from_spec(spec: Mapping) -> DataDistribution:
    """Rebuild a named data set from ``{"dataset": name, **arguments of its builder}``."""
    name = spec.get("dataset")
    if name not in DATASETS:
        raise ValueError(f"data spec key 'dataset' must be one of {sorted(DATASETS)}, got {name!r}")
    build = DATASETS[name]
    accepted = list(inspect.signature(build).parameters)
    args = {k: v for k, v in spec.items() if k != "dataset"}
    unknown = sorted(set(args) - set(accepted))
    if unknown:
        raise ValueError(
            f"data spec for dataset {name!r}: unknown key(s) {unknown}; accepted keys: "
            f"{['dataset', *accepted]}"
        )
    return build(**args)
