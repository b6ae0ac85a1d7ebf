"""Exact sampler and baseline laws on every path: numpy recursions written here, Monte Carlo of
the samplers, and the per-eigenvalue route at d = 3072."""

import functools
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

import mcm_prob as mp
from mcm_prob import paths

# (path, a, b): hand-written coefficients; schedules inside each path's time range
CASES = {
    "ou": (mp.OU, lambda t: np.exp(-t), lambda t: np.sqrt(1 - np.exp(-2 * t)), 3.0, 0.02),
    "vp": (
        paths.VP(),
        lambda t: np.exp(-0.5 * (0.1 * t + 9.95 * t**2)),
        lambda t: np.sqrt(1 - np.exp(-(0.1 * t + 9.95 * t**2))),
        1.0,
        0.01,
    ),
    "ve": (paths.VE(), lambda t: 1.0, lambda t: t, 20.0, 0.02),
    "linear": (paths.LinearInterpolant(), lambda t: 1 - t, lambda t: t, 1.0, 0.01),
    "trigflow": (
        paths.TrigFlow(0.5),
        lambda t: 0.0 if t == math.pi / 2 else math.cos(t),
        lambda t: 0.5 * math.sin(t),
        math.pi / 2,
        0.01,
    ),
    "custom": (
        paths.CustomPath(lambda t: 1.0 / (1.0 + t**2), lambda t: t * 1.0, t_max=2.0),
        lambda t: 1.0 / (1.0 + t**2),
        lambda t: t,
        2.0,
        0.01,
    ),
}
LAM = np.array([2.0, 0.3])
MEAN = np.array([0.7, -0.4])


def _numpy_sampler_law(a, b, t, s, prior_var):
    """Per coordinate of N(MEAN, diag(LAM)): the exact flow is affine, the re-noising the
    path's Gaussian transition; returns (mean, var)."""
    mu, var = np.zeros(2), np.full(2, prior_var)
    for k in range(len(t)):
        nu_t, nu_s = a(t[k]) ** 2 * LAM + b(t[k]) ** 2, a(s[k]) ** 2 * LAM + b(s[k]) ** 2
        g = np.sqrt(nu_s / nu_t)
        mu, var = g * (mu - a(t[k]) * MEAN) + a(s[k]) * MEAN, g**2 * var
        if k < len(t) - 1:
            r = a(t[k + 1]) / a(s[k])
            mu, var = r * mu, r**2 * var + b(t[k + 1]) ** 2 - r**2 * b(s[k]) ** 2
    return mu, var


@pytest.mark.parametrize("name", list(CASES))
def test_sampler_law_on_every_path(name, key):
    """sampler_law = the numpy recursion (1e-10) for several re-noising lengths, and Monte Carlo
    of `sample` with the exact flow agrees with it (z-tests at 5 standard errors)."""
    path, a, b, top, delta = CASES[name]
    data = mp.data.Gaussian(MEAN, np.diag(LAM))
    horizon = top if math.isfinite(path.t_max) else top
    for tau in (0.0, 0.3 * horizon, math.inf):
        t = np.array([horizon, 0.6 * horizon, 0.25 * horizon])
        sched = mp.Schedule.from_start_times(t, delta=delta, tau=tau)
        law = mp.sampler_law(data, schedule=sched, path=path)
        prior_var = float(path.prior_std(horizon)) ** 2
        mu, var = _numpy_sampler_law(a, b, sched.t, sched.s, prior_var)
        np.testing.assert_allclose(law.mean, mu, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(np.diag(law.covariance_matrix), var, rtol=1e-10)
    n = 20_000
    flow = mp.ExactFlow(data, path=path)
    x = np.asarray(mp.sample(flow, key, n, dim=2, schedule=sched, path=path).samples)
    z = (x.mean(0) - mu) / np.sqrt(var / n)
    assert np.all(np.abs(z) < 5), z
    zv = (x.var(0, ddof=1) / var - 1) / np.sqrt(2 / n)
    assert np.all(np.abs(zv) < 5), zv


def test_sampler_law_exact_start_and_perturbation_agree_with_dense(key):
    """start='exact' with no error reproduces p_delta exactly (the flow preserves it); the dense
    route (with a zero perturbation) equals the per-eigenvalue route."""
    data = mp.data.Gaussian(MEAN, [[1.0, 0.3], [0.3, 0.5]])
    vp = paths.VP()
    sched = mp.Schedule.from_start_times([1.0, 0.5, 0.2], delta=0.01, tau=0.1)
    law = mp.sampler_law(data, schedule=sched, path=vp, start="exact")
    assert mp.metrics.kl_gaussian(law, data.marginal(0.01, vp)) < 1e-20
    eig = mp.sampler_law(data, schedule=sched, path=vp)
    dense = mp.sampler_law(
        data, schedule=sched, path=vp, perturbation=(np.zeros((2, 2)), np.zeros(2))
    )
    np.testing.assert_allclose(eig.covariance_matrix, dense.covariance_matrix, rtol=1e-12)
    np.testing.assert_allclose(eig.mean, dense.mean, rtol=1e-12, atol=1e-14)


def _vp_numpy(method, lam, m, T, delta, steps, start):
    """Independent per-eigenvalue recursion of the four fixed-step baselines under VP, one
    step at a time, with beta(t) = 0.1 + 19.9 t written here."""
    big = lambda t: 0.1 * t + 9.95 * t**2  # noqa: E731
    beta = lambda t: 0.1 + 19.9 * t  # noqa: E731
    a = lambda t: np.exp(-0.5 * big(t))  # noqa: E731
    b2 = lambda t: -np.expm1(-big(t))  # noqa: E731
    t = np.linspace(T, delta, steps + 1)
    if start == "prior":
        mu, var = np.zeros_like(m), np.ones_like(lam)
    else:
        mu, var = a(T) * m, a(T) ** 2 * lam + b2(T)
    for k in range(steps):
        tk, tn = t[k], t[k + 1]
        h = tk - tn

        def affine_score(tau):  # score = -P z + P a m
            p = 1 / (a(tau) ** 2 * lam + b2(tau))
            return p, p * a(tau) * m

        p, r = affine_score(tk)
        f, g2 = -0.5 * beta(tk), beta(tk)
        if method == "sde_euler_maruyama":  # x' = x - h (f x - g^2 s) + sqrt(h g^2) xi
            A, c, q = 1 - h * f - h * g2 * p, h * g2 * r, h * g2
        elif method == "sde_exponential":  # VP: int beta over the step is the gap
            gap = big(tk) - big(tn)
            lin = np.exp(0.5 * gap)
            coef = a(tn) * 2 * (1 / a(tk) - 1 / a(tn))
            A, c, q = lin - coef * p, coef * r, np.expm1(gap)
        else:  # v = f z - g^2 / 2 s

            def vel(tau):
                pp, rr = affine_score(tau)
                return -0.5 * beta(tau) + 0.5 * beta(tau) * pp, -0.5 * beta(tau) * rr

            v1, w1 = vel(tk)
            if method == "ode_euler":
                A, c = 1 - h * v1, -h * w1
            else:
                v2, w2 = vel(tn)
                zt_a, zt_c = 1 - h * v1, -h * w1  # Euler predictor
                A = 1 - 0.5 * h * (v1 + v2 * zt_a)
                c = -0.5 * h * (w1 + v2 * zt_c + w2)
            q = 0.0
        mu, var = A * mu + c, A**2 * var + q
    return mu, var


def test_coefficients_on_padded_grids_equal_the_direct_ones_and_compile_once_per_size():
    """`on_time_grid` (the laws' path coefficients, padded to a power of two) gives every path's
    coefficients bit for bit as the direct call does (7 times, shape (7, 1) as in the laws);
    and `baseline_law` for K = 9 ... 16 steps compiles nothing after K = 9 (one padded size,
    16), where each K compiled its own operations before."""
    from mcm_prob.laws import on_time_grid

    def coefficients(path, t, s):
        return (path.a(t), path.b(t), path.a_dot(t), path.b_dot(t), *path.sde_coefficients(t),
                *path.transition_coefficients(s, t), *path.exponential_step(t, s))  # fmt: skip

    rng = np.random.default_rng(3)
    for path, _, _, top, delta in CASES.values():
        t = np.sort(rng.uniform(2 * delta, top, (7, 1)), axis=0)[::-1]
        s = t * rng.uniform(0.5, 1.0, (7, 1))
        got = on_time_grid(functools.partial(coefficients, path), t, s)
        for a, b in zip(got, coefficients(path, t, s), strict=True):
            assert a.shape == (7, 1)
            np.testing.assert_array_equal(a, np.asarray(b))
    compiled = []
    listener = lambda event, seconds, **kw: compiled.append(event)  # noqa: E731
    data = mp.data.Gaussian(MEAN, np.diag(LAM))
    mp.diffusion.baseline_law(data, "sde_exponential", T=1.0, delta=0.01, steps=9, path=paths.VP())
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for k in range(10, 17):
            mp.diffusion.baseline_law(data, "sde_exponential", T=1.0, delta=0.01, steps=k,
                                      path=paths.VP())  # fmt: skip
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert "/jax/core/compile/backend_compile_duration" not in compiled


@pytest.mark.parametrize("start", ["prior", "exact"])
def test_baseline_laws_under_vp_at_image_scale(start, rng):
    """d = 3072 Gaussian from eigenvalues, K = 200: baseline_law of the four schemes equals the
    per-eigenvalue numpy recursion above (1e-10), and the KL against p_delta is per eigenvalue."""
    d, steps, T, delta = 3072, 200, 1.0, 1e-3
    lam = np.sort(rng.gamma(0.5, 2.0, d))[::-1] + 1e-4
    m = rng.normal(size=d) * 0.1
    data = mp.data.Gaussian(eigvals=lam, mean=m)
    target = data.marginal(delta, paths.VP())
    for method in ("sde_euler_maruyama", "sde_exponential", "ode_euler", "ode_heun"):
        law = mp.diffusion.baseline_law(
            data, method, T=T, delta=delta, steps=steps, path=paths.VP(), start=start
        )
        mu, var = _vp_numpy(method, lam, m, T, delta, steps, start)
        np.testing.assert_allclose(law.mean, mu, rtol=1e-10, atol=1e-12, err_msg=method)
        np.testing.assert_allclose(law.variance, var, rtol=1e-10, err_msg=method)
        kl = mp.metrics.kl_gaussian(law, target)
        u = (
            var
            / (
                np.exp(-(0.1 * delta + 9.95 * delta**2)) * lam
                - np.expm1(-(0.1 * delta + 9.95 * delta**2))
            )
            - 1
        )
        nu = np.exp(-(0.1 * delta + 9.95 * delta**2)) * lam - np.expm1(
            -(0.1 * delta + 9.95 * delta**2)
        )
        want = 0.5 * np.sum(
            u - np.log1p(u) + (mu - np.exp(-0.5 * (0.1 * delta + 9.95 * delta**2)) * m) ** 2 / nu
        )
        assert abs(kl - want) <= 1e-10 * want


@pytest.mark.parametrize("name", ["vp", "ve", "linear"])
def test_baseline_samplers_match_their_laws(name, key):
    """Monte Carlo of the four baselines under a path against baseline_law (z-tests)."""
    path, *_, top, delta = CASES[name]
    data = mp.data.Gaussian(MEAN, np.diag(LAM))
    T = 0.9 * top if name == "linear" else top
    n = 20_000
    for method in ("sde_euler_maruyama", "sde_exponential", "ode_euler", "ode_heun"):
        law = mp.diffusion.baseline_law(data, method, T=T, delta=delta, steps=8, path=path)
        kind, scheme = method.split("_", 1)
        run = mp.diffusion.sample_sde if kind == "sde" else mp.diffusion.sample_ode
        x = np.asarray(
            run(data, key, n, T=T, delta=delta, steps=8, method=scheme, path=path).samples
        )
        var = np.diag(law.covariance_matrix)
        assert np.all(np.abs((x.mean(0) - law.mean) / np.sqrt(var / n)) < 5), method
        assert np.all(np.abs((x.var(0, ddof=1) / var - 1) / np.sqrt(2 / n)) < 5), method


def test_ode_baselines_start_at_the_top_of_the_interpolant(key):
    """The linear interpolant's prior is exact at t = 1: Heun from there with many steps
    reaches p_delta (KL < 1e-6); the SDE baselines refuse T = 1 by name."""
    path = paths.LinearInterpolant()
    data = mp.data.Gaussian(MEAN, np.diag(LAM))
    law = mp.diffusion.baseline_law(data, "ode_heun", T=1.0, delta=0.01, steps=400, path=path)
    assert mp.metrics.kl_gaussian(law, data.marginal(0.01, path)) < 1e-6
    with pytest.raises(ValueError, match="singular at T = 1"):
        mp.diffusion.sample_sde(data, key, 10, T=1.0, delta=0.01, steps=4, path=path)


def test_eigen_kl_and_w2_equal_the_dense_formulas(rng):
    d = 6
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    p_law = mp.data.EigenNormal(rng.normal(size=d), rng.uniform(0.5, 2, d), q)
    q_law = mp.data.EigenNormal(rng.normal(size=d), rng.uniform(0.5, 2, d), q)
    dense = [
        mp.data.Gaussian(np.asarray(law.mean), np.asarray(law.covariance_matrix)).marginal(0.0)
        for law in (p_law, q_law)
    ]
    np.testing.assert_allclose(
        mp.metrics.kl_gaussian(p_law, q_law), mp.metrics.kl_gaussian(*dense), rtol=1e-10
    )
    np.testing.assert_allclose(
        mp.metrics.w2_gaussian(p_law, q_law), mp.metrics.w2_gaussian(*dense), rtol=1e-8
    )
    x = jnp.asarray(rng.normal(size=(3, d)))
    np.testing.assert_allclose(p_law.log_prob(x), dense[0].log_prob(x), rtol=1e-12)
    jitted = jax.jit(lambda law, z: law.log_prob(z))(p_law, x)  # a pytree: (coef, var, basis)
    np.testing.assert_allclose(jitted, p_law.log_prob(x), rtol=1e-14)


@pytest.mark.parametrize("name", ["vp", "ve", "linear", "trigflow"])
def test_grid_law_on_every_path_equals_the_exact_gaussian_kl(name):
    """The 1-d grid law, propagated in OU coordinates, gives the path's exact KL (Gaussian
    data: sampler_law) to 1e-9 absolute + 1e-4 relative, with the exact flow and with it
    passed as a map f of the path's coordinates."""
    path, _, _, top, delta = CASES[name]
    data = mp.data.Gaussian([0.3], [[0.5]])
    sched = mp.Schedule.from_start_times([top, 0.5 * top, 0.2 * top], delta=delta, tau=0.1 * top)
    exact = mp.metrics.kl_gaussian(
        mp.sampler_law(data, schedule=sched, path=path), data.marginal(delta, path)
    )
    grid = mp.gridlaw.grid_law_1d(data, schedule=sched, path=path)
    assert abs(grid.kl - exact) <= 1e-9 + 1e-4 * exact
    pushed = mp.gridlaw.grid_law_1d(data, schedule=sched, f=mp.ExactFlow(data, path=path))
    assert abs(pushed.kl - grid.kl) <= 1e-10 + 1e-6 * grid.kl


class Isotropic(mp.data.ClosedFormGaussian):
    """A user family N(c, v I) that declares the Gaussian capability itself."""

    mean: jax.Array
    eigvals: jax.Array
    eigvecs: None = None
    regime: ClassVar[str] = "smooth"

    def __init__(self, center, var):
        self.mean = jnp.asarray(center, float)
        self.eigvals = jnp.full(self.mean.shape, float(var))

    @property
    def dim(self):
        return self.mean.shape[-1]

    def data_law(self):
        return dist.Normal(self.mean, jnp.sqrt(self.eigvals)).to_event(1)

    def noised_law(self, a, b):
        return dist.Normal(a * self.mean, jnp.sqrt(a**2 * self.eigvals + b**2)).to_event(1)

    def noised_score(self, x, a, b):
        a, b = jnp.asarray(a)[..., None], jnp.asarray(b)[..., None]
        return -(x - a * self.mean) / (a**2 * self.eigvals + b**2)


def test_a_user_family_with_the_gaussian_capability_gets_exact_tools(key):
    """Subclassing ClosedFormGaussian is enough for the closed-form flow, sampler_law and
    baseline_law: equal to the built-in Gaussian's to 1e-12 on VP."""
    mine, same = Isotropic([1.0, -0.5], 0.4), mp.data.Gaussian([1.0, -0.5], 0.4 * np.eye(2))
    vp = paths.VP()
    x = same.marginal(0.6, vp).sample(key, (4,))
    np.testing.assert_allclose(
        mp.flow_map(mine, x, 0.6, 0.1, path=vp, method="closed_form"),
        mp.flow_map(same, x, 0.6, 0.1, path=vp),
        rtol=1e-12,
    )
    sched = mp.Schedule.from_start_times([1.0, 0.4], delta=0.01, tau=0.1)
    for law in (
        lambda d: mp.sampler_law(d, schedule=sched, path=vp),
        lambda d: mp.diffusion.baseline_law(d, "ode_heun", T=1.0, delta=0.01, steps=5, path=vp),
    ):
        np.testing.assert_allclose(law(mine).mean, law(same).mean, rtol=1e-12)
        np.testing.assert_allclose(
            law(mine).covariance_matrix, law(same).covariance_matrix, rtol=1e-12
        )


def test_literature_schedules_in_the_times_of_a_path():
    """Karras on VE is EDM's sigma_i = (80^{1/7} + i/K (0.002^{1/7} - 80^{1/7}))^7; on VP the
    same noise levels mapped to VP times (rho_t = sqrt(e^{B(t)} - 1)); ECT's middle noise level
    is t = 0.821 on VE; the interpolant's infinite noise level at t = 1 is refused by name."""
    k, r = 4, 7.0
    edm = (80 ** (1 / r) + np.arange(k) / k * (0.002 ** (1 / r) - 80 ** (1 / r))) ** r
    ve = mp.Schedule.karras(T=80.0, delta=0.002, steps=k, path=paths.VE())
    np.testing.assert_allclose(ve.t, edm, rtol=1e-12)
    vp = paths.VP()
    sched = mp.Schedule.karras(T=1.0, delta=0.01, steps=k, path=vp)
    lo, hi = float(vp.rho(0.01)) ** (1 / r), float(vp.rho(1.0)) ** (1 / r)
    levels = (hi + np.arange(k) / k * (lo - hi)) ** r
    big = np.log1p(levels**2)  # B(t) = 0.1 t + 9.95 t^2
    want = (-0.1 + np.sqrt(0.01 + 4 * 9.95 * big)) / (2 * 9.95)
    np.testing.assert_allclose(sched.t, want, rtol=1e-10)
    assert mp.Schedule.ect(T=80.0, delta=0.002, path=paths.VE()).t[1] == pytest.approx(0.821)
    with pytest.raises(ValueError, match="noise level is infinite at T = 1"):
        mp.Schedule.karras(T=1.0, delta=0.01, steps=3, path=paths.LinearInterpolant())


def test_optimal_schedule_on_vp():
    """On VP, the optimiser's schedule is a valid VP schedule whose exact KL (schedule_kl on
    VP) is the reported one and at most the best start's; product targets are OU only."""
    data = mp.data.Gaussian(MEAN, [[0.5, 0.2], [0.2, 2.0]])
    vp = paths.VP()
    res = mp.optimal_schedule(data, 3, T=1.0, delta=0.01, iterations=100, n_random=1, path=vp)
    assert res.schedule.horizon == pytest.approx(1.0) and res.schedule.delta == pytest.approx(0.01)
    assert res.kl <= res.start_kl.min()
    np.testing.assert_allclose(
        res.kl, mp.accuracy.schedule_kl(data, res.schedule, path=vp), rtol=1e-12
    )
    with pytest.raises(ValueError, match="OU path only"):
        mp.optimal_schedule(mp.data.UniformBox([0.0], [1.0]), 2, T=1.0, delta=0.05, path=vp)
