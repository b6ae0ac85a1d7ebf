"""Families from 1-d densities (mcm_prob.densities): exact for their quadrature mixture,
second order in the cell width against the density itself, products of them through the
exact tools, specs that rebuild them."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

import mcm_prob as mp
from mcm_prob.accuracy import schedule_kl
from mcm_prob.densities import Density1D, Product

M, V = 0.3, 0.49


def normal_density(n=1024):
    return Density1D(lambda x: -0.5 * (x - M) ** 2 / V, -6.0, 6.0, n=n)


def test_a_gaussian_density_is_the_gaussian_with_the_cells_variance_added():
    """p~ = sum_i w_i N(x_i, h^2) of a normal density is N(m, v + h^2) to the quadrature's
    ripple (about 5e-9 relative at t = 0, round-off once b_t > 0): log-densities, scores
    and both log-CDF tails on OU and VE."""
    d = normal_density()
    h = d.spacing
    assert h == pytest.approx(12.0 / 1024, rel=1e-15)
    wide, true = mp.data.Gaussian([M], [[V + h * h]]), mp.data.Gaussian([M], [[V]])
    x = np.linspace(-3.0, 3.0, 13)[:, None]
    for path, times in ((mp.OU, (0.0, 0.01, 0.5, 3.0)), (mp.paths.VE(), (0.05, 2.0))):
        for t in times:
            tol = 2e-8 if t == 0.0 else 1e-12
            np.testing.assert_allclose(
                d.marginal(t, path).log_prob(x), wide.marginal(t, path).log_prob(x), atol=tol
            )
            np.testing.assert_allclose(
                d.score(x, t, path), wide.score(x, t, path), atol=tol * 1e3 if t == 0 else tol
            )
            a, b = float(path.a(t)), float(path.b(t))
            lo, hi = d.noised_log_cdfs(jnp.asarray(x[:, 0]), a, b)
            sd = np.sqrt(a**2 * (V + h * h) + b**2)
            np.testing.assert_allclose(lo, stats.norm.logcdf(x[:, 0], a * M, sd), atol=tol)
            np.testing.assert_allclose(hi, stats.norm.logsf(x[:, 0], a * M, sd), atol=tol)
    # against the density itself: the added variance h^2, second order in h
    err = lambda dd: float(  # noqa: E731
        jnp.max(jnp.abs(dd.marginal(0.1).log_prob(x) - true.marginal(0.1).log_prob(x)))
    )
    ratio = err(normal_density(256)) / err(normal_density(512))
    assert ratio == pytest.approx(4.0, rel=0.01)


def laplace_log_density(x, beta=0.5):
    return -jnp.abs(x) / beta


def laplace_marginal(y, a, b, beta=0.5):
    """log density and score of a X + b Z, X ~ Laplace(0, beta), by scipy quadrature (the
    score by Tweedie: (a E[X | y] - y) / b^2)."""
    p = lambda x: np.exp(-abs(x) / beta) / (2 * beta) * stats.norm.pdf(y, a * x, b)  # noqa: E731
    pts = [0.0]
    mass = integrate.quad(p, -40, 40, points=pts, epsabs=0, epsrel=1e-13, limit=400)[0]
    first = integrate.quad(
        lambda x: x * p(x), -40, 40, points=pts, epsabs=0, epsrel=1e-13, limit=400
    )[0]
    return np.log(mass), (a * first / mass - y) / b**2


def test_laplace_factor_converges_at_second_order_against_quadrature():
    """A Laplace density (kink at 0, declared non-smooth) on OU at t = 0.2: log p_t and the
    score against scipy quadrature of the convolution; the error falls 4x when h halves."""
    t = 0.2
    a, b = float(mp.OU.a(t)), float(mp.OU.b(t))
    y = np.array([-2.0, -0.7, 0.0, 0.4, 1.5])
    want = np.array([laplace_marginal(v, a, b) for v in y])
    errs = []
    for n in (1024, 2048):
        d = Density1D(laplace_log_density, -12.0, 12.0, n=n, regime="nonsmooth")
        got_lp = d.marginal(t).log_prob(y[:, None])
        got_s = d.score(y[:, None], t)[:, 0]
        errs.append((np.max(np.abs(got_lp - want[:, 0])), np.max(np.abs(got_s - want[:, 1]))))
    (lp1, s1), (lp2, s2) = errs
    h2 = (24.0 / 2048) ** 2
    assert lp2 < 3 * h2 and s2 < 3 * h2
    assert lp1 / lp2 == pytest.approx(4.0, rel=0.05) and s1 / s2 == pytest.approx(4.0, rel=0.05)
    with pytest.raises(ValueError, match="non-smooth"):
        Density1D(laplace_log_density, -20.0, 20.0, regime="nonsmooth").marginal(0.0)


@pytest.mark.heavy(25)
def test_product_of_densities_through_the_exact_tools():
    """A product of a normal density and a Laplace density: p_t factorises, the score is the
    factors' side by side, the exact KL of the grid laws of two normal-density factors equals
    the closed form of N(m, v + h^2) per coordinate, draws match the factor means, the ODE flow
    runs, and the spec (JSON) rebuilds the same scores."""
    nd = normal_density()
    lap = Density1D(laplace_log_density, -12.0, 12.0, n=512, regime="nonsmooth")
    prod = Product([nd, lap])
    assert prod.dim == 2 and prod.regime == "nonsmooth" and prod.factors() == [nd, lap]
    x = jnp.asarray([[0.1, -0.3], [1.2, 0.8], [-2.0, 0.0]])
    law = prod.marginal(0.3)
    np.testing.assert_allclose(
        law.log_prob(x),
        nd.marginal(0.3).log_prob(x[:, :1]) + lap.marginal(0.3).log_prob(x[:, 1:]),
        rtol=1e-14,
    )
    np.testing.assert_allclose(prod.score(x, 0.3)[:, 1], lap.score(x[:, 1:], 0.3)[:, 0], rtol=1e-14)
    draws = prod.sample(jax.random.key(0), 4000)
    assert draws.shape == (4000, 2)
    np.testing.assert_allclose(draws.mean(0), [M, 0.0], atol=4 * np.sqrt(0.5 / 4000))
    flowed = mp.flow_map(prod, x, 0.5, 0.1)
    assert flowed.shape == (3, 2) and bool(jnp.all(jnp.isfinite(flowed)))
    sched = mp.Schedule.constant(delta=0.05, h=0.5, steps=2, tau=np.inf)
    coarse = normal_density(64)  # the identity with N(m, v + h^2) holds at any n
    wide = mp.data.Gaussian([M, M], (V + coarse.spacing**2) * np.eye(2))
    # the grid laws' quadrature error: 3.4e-6 relative here
    assert schedule_kl(Product([coarse, coarse]), sched) == pytest.approx(
        schedule_kl(wide, sched), rel=2e-5
    )
    rebuilt = mp.data.from_spec(json.loads(json.dumps(prod.to_spec())))
    np.testing.assert_array_equal(rebuilt.score(x, 0.3), prod.score(x, 0.3))


def test_bad_densities_are_refused_by_name():
    with pytest.raises(ValueError, match="`low` < `high`"):
        Density1D(laplace_log_density, 1.0, -1.0)
    with pytest.raises(ValueError, match="no mass"):
        Density1D(lambda x: jnp.full_like(x, -jnp.inf), -1.0, 1.0, n=16)
    with pytest.raises(ValueError, match="NaN"):
        Density1D(lambda x: jnp.log(x), -1.0, 1.0, n=16)
    with pytest.raises(ValueError, match="`n`"):
        Density1D(laplace_log_density, -1.0, 1.0, n=8)
    with pytest.raises(ValueError, match="`regime`"):
        Density1D(laplace_log_density, -1.0, 1.0, regime="rough")
    with pytest.raises(ValueError, match=r"factors\[1\]` must be 1-d"):
        Product([normal_density(), mp.data.Gaussian([0.0, 0.0], np.eye(2))])
    with pytest.raises(TypeError, match="factors"):
        Product(normal_density())


def test_the_docs_examples_run_and_name_the_real_abstract_methods():
    """docs/conventions.md's 'Your own data' code runs as written: the minimal family defines
    exactly the base's abstract members (and works: its score is the Gaussian closed form),
    the product of densities gives (5, 3) scores."""
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "conventions.md").read_text()
    section = text[text.index("### Your own data") :]
    blocks = [b.split("```", 1)[0] for b in section.split("```python\n")[1:]]
    assert len(blocks) == 2
    scope: dict = {}
    exec(compile(blocks[0], "conventions.md", "exec"), scope)
    iso_cls = scope["Isotropic"]
    defined = {n for n in vars(iso_cls) if not n.startswith("_")} - {"regime"}
    assert defined == set(mp.data.DataDistribution.__abstractmethods__)
    iso = iso_cls(jnp.array([1.0, -0.5]), 0.4)
    x = jnp.asarray([[0.3, -1.0]])
    want = mp.data.Gaussian([1.0, -0.5], 0.4 * np.eye(2)).score(x, 0.7)
    np.testing.assert_allclose(iso.score(x, 0.7), want, rtol=1e-12)
    exec(compile(blocks[1], "conventions.md", "exec"), scope)
    assert scope["score"].shape == (5, 3) and scope["data"].regime == "nonsmooth"
    assert bool(jnp.all(jnp.isfinite(scope["score"])))
