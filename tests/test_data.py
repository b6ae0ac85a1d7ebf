"""Data families: exact marginals and scores against independent computations (scipy)."""

from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from scipy import integrate, stats
from scipy.special import logsumexp

import mcm_prob as mp
from mcm_prob.data import DiracMixture, Gaussian, GaussianMixture, NoisyUniform, UniformBox

MEAN = np.array([1.0, -0.5])
COV = np.array([[2.0, 0.6], [0.6, 0.5]])
SINGULAR = np.array([[1.0, 2.0], [2.0, 4.0]])  # rank 1
MIX = dict(
    weights=[0.3, 0.7],
    means=[[-2.0, 0.0], [2.0, 1.0]],
    covs=[[[1.0, 0.3], [0.3, 0.5]], [[0.4, 0.0], [0.0, 2.0]]],
)
ATOMS = np.array([[0.0, 0.0], [2.0, 2.0], [-1.0, 1.0]])
DIRAC_W = np.array([0.2, 0.5, 0.3])
LOW, HIGH = np.array([0.0, -1.0]), np.array([1.0, 2.0])
POINTS = np.array([[0.3, -0.2], [1.0, 1.0], [-3.0, 4.0], [0.0, 0.0], [2.0, 2.01]])


def scipy_logpdf(family, t, x):
    """Independent log p_t(x) from the definition X_t = alpha X_0 + sigma Z."""
    a, s = np.exp(-t), np.sqrt(1 - np.exp(-2 * t))
    if family == "gaussian":
        return stats.multivariate_normal(a * MEAN, a**2 * COV + s**2 * np.eye(2)).logpdf(x)
    if family == "singular":
        return stats.multivariate_normal(a * MEAN, a**2 * SINGULAR + s**2 * np.eye(2)).logpdf(x)
    if family == "mixture":
        comps = [
            np.log(w)
            + stats.multivariate_normal(
                a * np.array(m), a**2 * np.array(c) + s**2 * np.eye(2)
            ).logpdf(x)
            for w, m, c in zip(MIX["weights"], MIX["means"], MIX["covs"], strict=True)
        ]
        return logsumexp(np.stack(comps), axis=0)
    if family == "dirac":
        comps = [
            np.log(w) + stats.norm(a * atom, s).logpdf(x).sum(-1)
            for w, atom in zip(DIRAC_W, ATOMS, strict=True)
        ]
        return logsumexp(np.stack(comps), axis=0)
    if family == "box":
        out = np.zeros(len(x))
        for j, xi in enumerate(x):
            for i in range(2):
                dens = integrate.quad(
                    lambda u, xi=xi, i=i: stats.norm.pdf(xi[i], a * u, s) / (HIGH[i] - LOW[i]),
                    LOW[i],
                    HIGH[i],
                    epsabs=0,
                    epsrel=1e-13,
                    limit=200,
                )[0]
                out[j] += np.log(dens)
        return out
    raise KeyError(family)


def make(family):
    return {
        "gaussian": lambda: Gaussian(MEAN, COV),
        "singular": lambda: Gaussian(MEAN, SINGULAR),
        "mixture": lambda: GaussianMixture(**MIX),
        "dirac": lambda: DiracMixture(ATOMS, DIRAC_W),
        "box": lambda: UniformBox(LOW, HIGH),
    }[family]()


FAMILIES = ["gaussian", "singular", "mixture", "dirac", "box"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("t", [0.05, 0.5, 3.0])
def test_log_prob_matches_scipy(family, t):
    data = make(family)
    lp = np.asarray(data.marginal(t).log_prob(jnp.asarray(POINTS)))
    np.testing.assert_allclose(lp, scipy_logpdf(family, t, POINTS), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("t", [1e-3, 0.5, 3.0])
def test_score_is_gradient_of_log_prob(family, t):
    data = make(family)
    x = jnp.asarray(POINTS)
    auto = jax.vmap(jax.grad(data.marginal(t).log_prob))(x)
    np.testing.assert_allclose(data.score(x, t), auto, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("family,cov", [("gaussian", COV), ("singular", SINGULAR)])
def test_gaussian_score_closed_form(family, cov):
    t = 0.2
    data = make(family)
    a, s = np.exp(-t), np.sqrt(1 - np.exp(-2 * t))
    cov_t = a**2 * cov + s**2 * np.eye(2)
    expected = -np.linalg.solve(cov_t, (POINTS - a * MEAN).T).T
    np.testing.assert_allclose(data.score(POINTS, t), expected, rtol=1e-12)
    np.testing.assert_allclose(data.cov_t(t), cov_t, rtol=1e-14)


def one_d(family):
    return {
        "gaussian": lambda: Gaussian([0.5], [[0.7]]),
        "mixture": lambda: GaussianMixture([0.4, 0.6], [[-1.0], [1.5]], [[[0.2]], [[0.5]]]),
        "dirac": lambda: DiracMixture([[-1.0], [0.0], [2.0]], [0.2, 0.3, 0.5]),
        "box": lambda: UniformBox([-1.0], [2.0]),
    }[family]()


@pytest.mark.parametrize("family", ["gaussian", "mixture", "dirac", "box"])
@pytest.mark.parametrize("t", [0.01, 1.0])
def test_density_integrates_to_one_in_1d(family, t):
    data = one_d(family)
    lp = jax.jit(lambda x: data.marginal(t).log_prob(x[None, None])[0])
    breaks = [-3.0, -1.0, 0.0, 1.5, 2.0]
    total = integrate.quad(
        lambda x: float(jnp.exp(lp(x))), -40, 40, points=breaks, limit=500, epsabs=1e-13
    )[0]
    assert abs(total - 1.0) < 1e-8


def test_small_t_is_finite():
    """Dirac mixture at t = 1e-4, box at t = 1e-4 and t = 30: finite values even far away."""
    far = jnp.array([[50.0, -50.0], [0.0, 0.0], [1e-3, 2.0], [-7.0, 3.0]])
    for data, t in [(make("dirac"), 1e-4), (make("box"), 1e-4), (make("box"), 30.0)]:
        assert np.all(np.isfinite(data.marginal(t).log_prob(far)))
        assert np.all(np.isfinite(data.score(far, t)))
    # deep in the box's tail the score is the Gaussian one around the nearest face
    box = UniformBox([0.0], [1.0])
    t = 1e-4
    a, s = np.exp(-t), np.sqrt(1 - np.exp(-2 * t))
    x = jnp.array([[-0.5]])  # 35 sigma below the lower face
    mills = stats.norm.pdf(-0.5 / s) / stats.norm.cdf(-0.5 / s) / s
    np.testing.assert_allclose(box.score(x, t)[0, 0], mills, rtol=1e-10)
    assert a > 0


def test_dirac_small_t_score_points_to_nearest_atom():
    data = make("dirac")
    t = 1e-4
    x = jnp.asarray(ATOMS) * np.exp(-t) + 1e-3
    expected = -1e-3 / (1 - np.exp(-2 * t))
    np.testing.assert_allclose(data.score(x, t), expected, rtol=1e-9)


def test_noisy_uniform_large_t_matches_standard_normal():
    """At t = 30 the box marginal equals N(0,1) up to alpha ~ 1e-13: log density and score."""
    t = 30.0
    d = NoisyUniform(0.0, 1.0, np.exp(-t), np.sqrt(-np.expm1(-2 * t)))
    x = jnp.linspace(-4, 4, 9)
    np.testing.assert_allclose(d.log_prob(x), stats.norm.logpdf(np.asarray(x)), atol=1e-12)
    np.testing.assert_allclose(d.score(x), -np.asarray(x), atol=1e-12)


@pytest.mark.parametrize("family", FAMILIES)
def test_sample_and_marginal_sample_moments(family, key):
    """Data draws and marginal draws have the exact means (5 standard errors, n = 40,000)."""
    data = make(family)
    n, t = 40_000, 0.4
    k1, k2 = jax.random.split(key)
    x0 = np.asarray(data.sample(k1, n))
    xt = np.asarray(data.marginal(t).sample(k2, (n,)))
    assert x0.shape == xt.shape == (n, 2)
    mean0 = {
        "gaussian": MEAN,
        "singular": MEAN,
        "mixture": np.average(MIX["means"], axis=0, weights=MIX["weights"]),
        "dirac": DIRAC_W @ ATOMS,
        "box": (LOW + HIGH) / 2,
    }[family]
    se0 = x0.std(0) / np.sqrt(n)
    assert np.all(np.abs(x0.mean(0) - mean0) < 5 * se0)
    se_t = xt.std(0) / np.sqrt(n)
    assert np.all(np.abs(xt.mean(0) - np.exp(-t) * mean0) < 5 * se_t)


def test_singular_gaussian_samples_on_subspace(key):
    data = make("singular")
    x0 = np.asarray(data.sample(key, 1000))
    # SINGULAR = v v^T with v = (1, 2): x0 - mean is parallel to v
    resid = (x0 - MEAN) @ np.array([2.0, -1.0])
    assert np.max(np.abs(resid)) < 1e-12
    np.testing.assert_allclose(np.var((x0 - MEAN)[:, 0]), 1.0, rtol=0.15)


def test_regimes_and_dims():
    assert make("gaussian").regime == "smooth"
    assert make("mixture").regime == "smooth"
    for family in ["singular", "dirac", "box"]:
        assert make(family).regime == "nonsmooth"
    assert GaussianMixture([1.0], [[0.0, 0.0]], [SINGULAR]).regime == "nonsmooth"
    assert all(make(f).dim == 2 for f in FAMILIES)


def test_smooth_marginal_at_zero_is_data_density():
    data = make("mixture")
    np.testing.assert_allclose(
        data.marginal(0.0).log_prob(POINTS), scipy_logpdf("mixture", 0.0, POINTS), rtol=1e-12
    )


@pytest.mark.parametrize("family", ["singular", "dirac", "box"])
def test_nonsmooth_has_no_density_at_zero(family):
    data = make(family)
    with pytest.raises(ValueError, match="non-smooth.*`t` must be > 0"):
        data.marginal(0.0)
    with pytest.raises(ValueError, match="non-smooth"):
        data.score(POINTS, 0.0)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: Gaussian([0.0, 1.0], [[1.0, 0.5], [0.4, 1.0]]), "`cov` must be symmetric"),
        (
            lambda: Gaussian([0.0, 1.0], [[1.0, 2.0], [2.0, 1.0]]),
            "`cov` must be positive semi-definite",
        ),
        (lambda: Gaussian([0.0, 1.0], np.eye(3)), r"`cov` must have shape \(2, 2\)"),
        (lambda: Gaussian([np.nan, 1.0], np.eye(2)), "`mean` must be finite"),
        (lambda: Gaussian([[0.0, 1.0]], np.eye(2)), "`mean` must have 1 dimension"),
        (lambda: GaussianMixture([0.5, 0.6], MIX["means"], MIX["covs"]), "`weights` must sum to 1"),
        (
            lambda: GaussianMixture([1.2, -0.2], MIX["means"], MIX["covs"]),
            "`weights` must be non-negative",
        ),
        (
            lambda: GaussianMixture([1.0], MIX["means"], MIX["covs"]),
            "`weights` has 1 entries but there are 2",
        ),
        (
            lambda: GaussianMixture(MIX["weights"], MIX["means"], MIX["covs"][:1]),
            r"`covs` must have shape \(2, 2, 2\)",
        ),
        (
            lambda: GaussianMixture(MIX["weights"], MIX["means"], [COV, -COV]),
            r"`covs\[1\]` must be positive semi-definite",
        ),
        (lambda: DiracMixture([0.0, 1.0]), "`atoms` must have 2 dimension"),
        (lambda: DiracMixture(ATOMS, [0.5, 0.5]), "`weights` has 2 entries but there are 3"),
        (lambda: DiracMixture(ATOMS, [0.5, np.inf, 0.5]), "`weights` must be finite"),
        (lambda: UniformBox([0.0, 1.0], [1.0, 1.0]), "need `low` < `high`"),
        (lambda: UniformBox([0.0], [1.0, 2.0]), "equal shapes"),
        (lambda: UniformBox(["a"], [1.0]), "`low` must be a real array"),
    ],
)
def test_bad_constructor_arguments(build, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build()


def test_bad_call_arguments(key):
    data = make("gaussian")
    with pytest.raises(ValueError, match="`x` must have trailing dimension 2"):
        data.score(jnp.zeros((4, 3)), 0.5)
    with pytest.raises(ValueError, match="`x` must be finite"):
        data.score(jnp.array([[np.nan, 0.0]]), 0.5)
    with pytest.raises(ValueError, match="`t` must be >= 0"):
        data.marginal(-0.1)
    with pytest.raises(ValueError, match="`t` must be finite"):
        data.score(POINTS, np.inf)
    for n in [0, -3, 2.5, True]:
        with pytest.raises(ValueError, match="`n` must be an integer >= 1"):
            data.sample(key, n)


def test_jit_through_data_pytrees():
    data = make("mixture")
    f = jax.jit(lambda d, x, t: d.score(x, t))
    np.testing.assert_allclose(f(data, POINTS, 0.3), data.score(POINTS, 0.3), rtol=1e-13)


def test_score_and_velocity_are_one_program_per_shape():
    """`score` and `pf_ode_velocity` run as one compiled program per input shape (plus one for
    the finiteness check): a new batch shape compiles at most 3 programs (one operation at a
    time, the mixture's score compiled about 20). On the linear path (a = 0 at its top, which
    the compiled program handles with a `where`) the values are the eager computation's to
    1e-14 relative (the velocity, a difference of terms of size 1, to 1e-15 absolute): XLA
    fuses the operations, so the last bits may differ."""
    compiled = []

    def listener(event, seconds, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(seconds)

    rng = np.random.default_rng(4)
    data = make("mixture")
    for path in (mp.OU, mp.paths.LinearInterpolant()):
        for n in (5, 6):
            x = jnp.asarray(rng.normal(size=(n, 2)))
            jax.monitoring.register_event_duration_secs_listener(listener)
            try:
                score = data.score(x, 0.4, path)
                velocity = mp.pf_ode_velocity(data, x, 0.4, path=path)
            finally:
                jax.monitoring.unregister_event_duration_listener(listener)
            count = len(compiled)
            compiled.clear()
            if n == 5:  # the first call compiles what does not depend on the shape
                continue
            assert count <= 3, (path.name, count)
            if path is mp.OU:  # the values on the path whose score the jit selects with `where`
                continue
            eager = data.unchecked_score(x, 0.4, path)
            np.testing.assert_allclose(score, eager, rtol=1e-14, atol=1e-300)
            eager = mp.flow.velocity(data, x, 0.4, path)
            np.testing.assert_allclose(velocity, eager, rtol=1e-14, atol=1e-15)


def test_dirac_data_law_atoms(key):
    """Draws of a Dirac mixture hit the atoms with the weights' frequencies (5 binomial SE,
    n = 20,000); the t = 0 law's log_prob is log w at an atom and -inf elsewhere."""
    data = make("dirac")
    x = np.asarray(data.sample(key, 20_000))
    counts = np.array([np.all(x == a, axis=1).sum() for a in ATOMS]) / 20_000
    assert counts.sum() == 1.0
    assert np.all(np.abs(counts - DIRAC_W) < 5 * np.sqrt(DIRAC_W * (1 - DIRAC_W) / 20_000))
    law = data.data_law()
    np.testing.assert_allclose(law.log_prob(jnp.asarray(ATOMS)), np.log(DIRAC_W), rtol=1e-14)
    assert law.log_prob(jnp.array([0.0, 0.1])) == -np.inf


SPECS = {
    "gaussian": {
        "family": "gaussian",
        "mean": [0.5, -1.0, 2.0],
        "cov": np.diag([1.0, 0.5, 2.0]).tolist(),
    },
    "singular": {"family": "gaussian", "mean": [0.0, 1.0], "cov": [[1.0, 1.0], [1.0, 1.0]]},
    "mixture": {
        "family": "gaussian_mixture",
        "weights": [0.25, 0.75],
        "means": [[0.0, 0.0, 0.0, 0.0, 1.0], [1.0, -1.0, 0.0, 2.0, 0.0]],
        "covs": [np.eye(5).tolist(), (0.3 * np.eye(5)).tolist()],
    },
    "dirac": {
        "family": "dirac_mixture",
        "atoms": [[0.0], [1.0], [3.0]],
        "weights": [0.2, 0.3, 0.5],
    },
    "box": {"family": "uniform_box", "low": [-1.0, 0.0, 2.0, -3.0], "high": [1.0, 0.5, 4.0, 3.0]},
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_spec_round_trip(name):
    """from_spec(spec) builds the family; to_spec() gives back a JSON-able spec that rebuilds a
    distribution with identical scores (bit for bit) and the same regime."""
    import json

    spec = SPECS[name]
    data = mp.data.from_spec(spec)
    again = mp.data.from_spec(json.loads(json.dumps(data.to_spec())))
    assert type(again) is type(data) and again.regime == data.regime
    assert data.regime == ("smooth" if name in ("gaussian", "mixture") else "nonsmooth")
    x = data.marginal(0.2).sample(jax.random.key(3), (20,))
    np.testing.assert_array_equal(again.score(x, 0.2), data.score(x, 0.2))


@pytest.mark.parametrize(
    "spec,match",
    [
        ([1, 2], "must be a dict with a 'family' key"),
        ({"mean": [0.0]}, "key 'family' must be one of"),
        ({"family": "laplace"}, "key 'family' must be one of"),
        (
            {"family": "gaussian", "mean": [0.0]},
            r"family 'gaussian': needs `cov` or `eigvals`",
        ),
        (
            {"family": "uniform_box", "low": [0], "high": [1], "width": 2},
            r"unknown key\(s\) \['width'\]",
        ),
        (
            {"family": "gaussian_mixture", "weights": [0.5], "means": [[0.0]], "covs": [[[1.0]]]},
            "sum to 1",
        ),
        ({"family": "uniform_box", "low": [1.0], "high": [0.0]}, "`low` < `high`"),
        ({"family": "dirac_mixture", "atoms": "abc"}, "`atoms` must be a real array"),
    ],
)
def test_bad_specs(spec, match):
    with pytest.raises((ValueError, TypeError), match=match):
        mp.data.from_spec(spec)


def test_registered_user_family_round_trips():
    class Shifted(mp.data.DataDistribution):
        """N(shift, I): a user family with a spec."""

        shift: jax.Array
        regime: ClassVar[str] = "smooth"
        family = "test_shifted"
        spec_fields = ("shift",)

        def __init__(self, shift):
            self.shift = jnp.asarray(shift, float)

        @property
        def dim(self):
            return self.shift.shape[-1]

        def data_law(self):
            return mp.data.Gaussian(self.shift, np.eye(self.dim)).data_law()

        def noised_law(self, a, b):
            return dist.Normal(a * self.shift, jnp.sqrt(a**2 + b**2)).to_event(1)

        def noised_score(self, x, a, b):
            a, b = jnp.asarray(a)[..., None], jnp.asarray(b)[..., None]
            return -(x - a * self.shift) / (a**2 + b**2)

    try:
        mp.data.register_family(Shifted)
        data = mp.data.from_spec({"family": "test_shifted", "shift": [1.0, 2.0]})
        assert data.to_spec() == {"family": "test_shifted", "shift": [1.0, 2.0]}
        np.testing.assert_allclose(data.score(jnp.zeros((1, 2)), 0.0), [[1.0, 2.0]])
    finally:
        mp.data.FAMILIES.pop("test_shifted", None)
