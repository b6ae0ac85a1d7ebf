"""Multi-step sampler against its exact law on Gaussian data; Gaussian KL and W2."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from scipy import linalg

import mcm_prob as mp

MEAN = np.array([1.0, -0.5])
COV = np.array([[2.0, 0.6], [0.6, 0.5]])
GAUSS = mp.data.Gaussian(MEAN, COV)
SINGULAR = mp.data.Gaussian(MEAN, [[1.0, 2.0], [2.0, 4.0]])
CENTRED = mp.data.Gaussian([0.0, 0.0], COV)


def law_by_scalar_recursion(mean, cov, delta, h, steps, tau):
    """Independent computation: in the eigenbasis of cov every coordinate evolves on its own."""
    lam, u = np.linalg.eigh(cov)
    m = u.T @ mean
    nu = lambda tau_: lam * math.exp(-2 * tau_) + 1 - math.exp(-2 * tau_)  # noqa: E731
    mu, var = np.zeros(len(mean)), np.ones(len(mean))
    t = [delta + (steps - k) * h for k in range(steps + 1)]
    for k in range(steps):
        s_k = max(t[k + 1] - tau, delta) if k < steps - 1 else delta
        r = np.sqrt(nu(s_k) / nu(t[k]))
        mu = math.exp(-s_k) * m + r * (mu - math.exp(-t[k]) * m)
        var = r**2 * var
        if k < steps - 1:
            g = t[k + 1] - s_k
            mu, var = math.exp(-g) * mu, math.exp(-2 * g) * var + 1 - math.exp(-2 * g)
    return u @ mu, (u * var) @ u.T


@pytest.mark.parametrize("data", [GAUSS, SINGULAR], ids=["pd", "singular"])
@pytest.mark.parametrize("tau", [0.0, 0.35, math.inf])
def test_sampler_law_matches_independent_closed_form(data, tau):
    delta, h, steps = 0.01, 0.4, 6
    law = mp.sampler_law(data, delta=delta, h=h, steps=steps, tau=tau)
    mean, cov = law_by_scalar_recursion(MEAN, np.asarray(data.cov), delta, h, steps, tau)
    np.testing.assert_allclose(law.mean, mean, rtol=1e-8, atol=1e-14)
    np.testing.assert_allclose(law.covariance_matrix, cov, rtol=1e-8, atol=1e-14)


@pytest.mark.parametrize("data", [GAUSS, SINGULAR], ids=["pd", "singular"])
@pytest.mark.parametrize("tau", [0.0, 0.35, math.inf])
def test_sampler_monte_carlo_matches_law(data, tau, key):
    """n = 40,000 draws of `sample` with the exact flow: mean and covariance within 5 standard
    errors of `sampler_law`."""
    delta, h, steps, n = 0.01, 0.4, 4, 40_000
    out = mp.sample(mp.ExactFlow(data), key, n, dim=2, delta=delta, h=h, steps=steps, tau=tau)
    assert out.nfe == steps and out.samples.shape == (n, 2)
    law = mp.sampler_law(data, delta=delta, h=h, steps=steps, tau=tau)
    x = np.asarray(out.samples)
    cov = np.asarray(law.covariance_matrix)
    assert np.all(np.abs(x.mean(0) - np.asarray(law.mean)) < 5 * np.sqrt(np.diag(cov) / n))
    se_cov = np.sqrt((cov**2 + np.outer(np.diag(cov), np.diag(cov))) / n)
    assert np.all(np.abs(np.cov(x.T) - cov) < 5 * se_cov)


def test_deterministic_sampler_preserves_kl():
    """tau = 0 with the exact flow: KL(law || p_delta) = KL(N(0, I) || p_T), T = delta + K h."""
    delta, h = 0.01, 0.3
    for steps in (1, 3, 8):
        law = mp.sampler_law(GAUSS, delta=delta, h=h, steps=steps, tau=0.0)
        start = dist.MultivariateNormal(jnp.zeros(2), jnp.eye(2))
        expected = mp.metrics.kl_gaussian(start, GAUSS.marginal(delta + steps * h))
        got = mp.metrics.kl_gaussian(law, GAUSS.marginal(delta))
        np.testing.assert_allclose(got, expected, rtol=1e-8)


@pytest.mark.parametrize("data,slope", [(GAUSS, -2.0), (CENTRED, -4.0)], ids=["mean", "centred"])
def test_log_kl_is_linear_in_steps(data, slope):
    """log KL vs K at fixed h has slope -2h (mean != 0) or -4h (mean = 0), within 2%."""
    delta, h = 0.01, 0.5
    ks = np.arange(8, 17)
    kl = [
        mp.metrics.kl_gaussian(
            mp.sampler_law(data, delta=delta, h=h, steps=int(k)), data.marginal(delta)
        )
        for k in ks
    ]
    fitted = np.polyfit(ks, np.log(kl), 1)[0]
    assert abs(fitted / (slope * h) - 1) < 0.02


def test_renoising_lowers_kl():
    """At fixed steps, tau > 0 contracts the start-up error: KL decreases with tau."""
    delta, h, steps = 0.01, 0.3, 5
    target = GAUSS.marginal(delta)
    kls = [
        mp.metrics.kl_gaussian(
            mp.sampler_law(GAUSS, delta=delta, h=h, steps=steps, tau=tau), target
        )
        for tau in (0.0, 0.1, 0.3, 1.0, math.inf)
    ]
    assert all(a > b for a, b in zip(kls[:-1], kls[1:], strict=True))


def test_affine_perturbation_law_and_eps_squared_scaling(key):
    """Perturbed flow f = Phi + eps (A x + b): the law matches Monte Carlo, and with a negligible
    start-up error (T = 12) KL scales as eps^2 (ratio 4 within 2% when eps doubles)."""
    a = np.array([[0.3, -0.1], [0.2, 0.1]])
    b = np.array([0.1, -0.2])
    delta, h, steps = 0.01, 1.0, 12
    target = GAUSS.marginal(delta)
    kl = [
        mp.metrics.kl_gaussian(
            mp.sampler_law(GAUSS, delta=delta, h=h, steps=steps, perturbation=(e * a, e * b)),
            target,
        )
        for e in (1e-3, 2e-3)
    ]
    assert abs(kl[1] / kl[0] - 4) < 0.08
    err = mp.affine_error(GAUSS, (a, b), [0.5, 1.0])
    assert err.shape == (2,) and np.all(err > 0)
    # Monte Carlo check of the perturbed law
    flow = mp.ExactFlow(GAUSS)
    f = lambda x, t, s: flow(x, t, s) + x @ jnp.asarray(a).T + jnp.asarray(b)  # noqa: E731
    n = 40_000
    x = np.asarray(mp.sample(f, key, n, dim=2, delta=delta, h=0.5, steps=3, tau=0.2).samples)
    law = mp.sampler_law(GAUSS, delta=delta, h=0.5, steps=3, tau=0.2, perturbation=(a, b))
    sd = np.sqrt(np.diag(np.asarray(law.covariance_matrix)))
    assert np.all(np.abs(x.mean(0) - np.asarray(law.mean)) < 5 * sd / np.sqrt(n))


def test_affine_error_closed_form(key):
    a = np.array([[0.3, -0.1], [0.2, 0.1]])
    b = np.array([0.1, -0.2])
    x = np.asarray(GAUSS.marginal(0.7).sample(key, (200_000,)))
    sq = np.sum((x @ a.T + b) ** 2, -1)
    assert abs(mp.affine_error(GAUSS, (a, b), 0.7) - sq.mean()) < 5 * sq.std() / np.sqrt(sq.size)


def test_named_special_cases():
    f = mp.ExactFlow(GAUSS)
    k = jax.random.key(3)
    kw = dict(dim=2, delta=0.01, h=0.3, steps=3)
    base = mp.sample(f, k, 10, tau=0.0, **kw).samples
    np.testing.assert_array_equal(mp.sample_deterministic(f, k, 10, **kw).samples, base)
    np.testing.assert_array_equal(
        mp.sample_song(f, k, 10, **kw).samples, mp.sample(f, k, 10, tau=math.inf, **kw).samples
    )
    np.testing.assert_array_equal(
        mp.sample_gamma(f, k, 10, gamma=0.5, **kw).samples,
        mp.sample(f, k, 10, tau=0.15, **kw).samples,
    )
    t, s, gap = mp.sampler_times(delta=0.01, h=0.3, steps=3, tau=0.5)
    np.testing.assert_allclose(t, [0.91, 0.61, 0.31, 0.01])
    np.testing.assert_allclose(s, [0.11, 0.01, 0.01])
    np.testing.assert_allclose(gap, [0.5, 0.3])


def test_sample_is_jittable():
    f = mp.ExactFlow(GAUSS)
    k = jax.random.key(4)
    jitted = jax.jit(
        lambda key: mp.sample(f, key, 8, dim=2, delta=0.01, h=0.3, steps=3, tau=0.2).samples
    )
    np.testing.assert_allclose(
        jitted(k),
        mp.sample(f, k, 8, dim=2, delta=0.01, h=0.3, steps=3, tau=0.2).samples,
        rtol=1e-12,
    )


def test_kl_gaussian_against_direct_formula():
    rng = np.random.default_rng(0)
    for d in (1, 3, 5):
        a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
        cp, cq = a @ a.T + 0.5 * np.eye(d), b @ b.T + 0.5 * np.eye(d)
        mp_, mq = rng.normal(size=d), rng.normal(size=d)
        p = dist.MultivariateNormal(jnp.asarray(mp_), jnp.asarray(cp))
        q = dist.MultivariateNormal(jnp.asarray(mq), jnp.asarray(cq))
        qi = np.linalg.inv(cq)
        direct = 0.5 * (
            np.trace(qi @ cp)
            + (mq - mp_) @ qi @ (mq - mp_)
            - d
            + np.linalg.slogdet(cq)[1]
            - np.linalg.slogdet(cp)[1]
        )
        np.testing.assert_allclose(mp.metrics.kl_gaussian(p, q), direct, rtol=1e-10)
        assert mp.metrics.kl_gaussian(p, p) == pytest.approx(0.0, abs=1e-14)


def test_kl_gaussian_tiny_values_keep_relative_accuracy():
    u = 1e-10
    d = 4
    p = dist.MultivariateNormal(jnp.zeros(d), (1 + u) * jnp.eye(d))
    q = dist.MultivariateNormal(jnp.zeros(d), jnp.eye(d))
    exact = 0.5 * d * (u - math.log1p(u))
    np.testing.assert_allclose(mp.metrics.kl_gaussian(p, q), exact, rtol=1e-5)


def test_w2_gaussian():
    p = dist.MultivariateNormal(jnp.array([1.0]), jnp.array([[4.0]]))
    q = dist.MultivariateNormal(jnp.array([-1.0]), jnp.array([[1.0]]))
    np.testing.assert_allclose(mp.metrics.w2_gaussian(p, q), math.sqrt(4 + 1), rtol=1e-12)
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(3, 3)), rng.normal(size=(3, 3))
    cp, cq = a @ a.T, b @ b.T + np.eye(3)
    rq = linalg.sqrtm(cq)
    ref = np.sqrt(np.trace(cp + cq - 2 * np.real(linalg.sqrtm(rq @ cp @ rq))))
    p = dist.MultivariateNormal(jnp.zeros(3), jnp.asarray(cp + 1e-300 * np.eye(3)))
    q = dist.MultivariateNormal(jnp.zeros(3), jnp.asarray(cq))
    np.testing.assert_allclose(mp.metrics.w2_gaussian(p, q), ref, rtol=1e-7)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(h=0.0), "`h` must be a finite number > 0"),
        (dict(delta=0.0), "`delta` must be a finite number > 0"),
        (dict(steps=0), "`steps` must be an integer >= 1"),
        (dict(tau=-1.0), r"`tau` must be a number \(inf allowed\) >= 0"),
        (dict(n=0), "`n` must be an integer >= 1"),
        (dict(dim=0), "`dim` must be an integer >= 1"),
    ],
)
def test_bad_sampler_arguments(kwargs, match):
    args = dict(n=4, dim=2, delta=0.01, h=0.3, steps=2, tau=0.0) | kwargs
    n = args.pop("n")
    with pytest.raises(ValueError, match=match):
        mp.sample(mp.ExactFlow(GAUSS), jax.random.key(0), n, **args)


def test_bad_law_arguments():
    with pytest.raises(TypeError, match=r"`data` must be Gaussian \(mcm_prob.data.Gaussian"):
        mp.sampler_law(mp.data.DiracMixture([[0.0]]), delta=0.01, h=0.1, steps=2)
    with pytest.raises(ValueError, match="`perturbation` must be"):
        mp.sampler_law(GAUSS, delta=0.01, h=0.1, steps=2, perturbation=(np.eye(3), np.zeros(3)))
    with pytest.raises(ValueError, match="same dimension"):
        mp.metrics.kl_gaussian(GAUSS.marginal(1.0), mp.data.Gaussian([0.0], [[1.0]]).marginal(1.0))
    with pytest.raises(TypeError, match="`p` must be a Gaussian law"):
        mp.metrics.kl_gaussian(object(), GAUSS.marginal(1.0))


def test_sample_grid_equals_per_model_sampling():
    """Every model of a FittedGrid sampled in one program: model (i, j) with keys[j] gives
    `sample(grid[i, j], keys[j], ...)` to float32 round-off; skipped models are NaN."""
    data = mp.data.Gaussian([1.0, -0.5], [[1.0, 0.3], [0.3, 0.5]])
    cfg = mp.TrainConfig(iterations=30, width=16, depth=1, batch_size=32, T=2.0, progress=False)
    grid, _ = mp.fit_grid(data, cfg, steps=[0.1, 0.4], seeds=[0, 1, 2])
    sched = mp.Schedule.constant(delta=0.01, h=0.6, steps=3, tau=0.2)
    keys = jnp.stack([jax.random.key(k) for k in (5, 6, 7)])
    out = mp.sample_grid(grid, keys, 50, dim=2, schedule=sched)
    assert out.shape == (2, 3, 50, 2)
    for i in range(2):
        for j in range(3):
            alone = mp.sample(grid[i, j], keys[j], 50, dim=2, schedule=sched).samples
            np.testing.assert_allclose(out[i, j], alone, rtol=1e-5, atol=1e-6)
    skip = np.array([[False, True, False], [False, False, False]])
    masked = mp.sample_grid(grid, keys, 50, dim=2, schedule=sched, skip=skip)
    assert np.all(np.isnan(masked[0, 1])) and np.array_equal(masked[1], out[1])
    with pytest.raises(ValueError, match="one key per grid column"):
        mp.sample_grid(grid, keys[:2], 50, dim=2, schedule=sched)
    with pytest.raises(ValueError, match="`skip` must have the grid's shape"):
        mp.sample_grid(grid, keys, 50, dim=2, schedule=sched, skip=skip[:1])
