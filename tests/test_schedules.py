"""Schedules: the type and its constructors, optimal schedules from exact KL, grid laws of the
sampler driven by any f (learned nets included), steps-to-accuracy reasons."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mcm_prob as mp
from mcm_prob.accuracy import schedule_kl, steps_to_accuracy
from mcm_prob.gridlaw import coordinate_maps, grid_law_1d, law_grid, product_kl
from mcm_prob.optimal import optimal_schedule
from mcm_prob.schedules import Schedule

DELTA = 0.01


def gaussian(d):
    return mp.data.Gaussian(np.full(d, 0.5), np.diag(np.linspace(0.5, 2.0, d)))


@pytest.mark.parametrize("tau", [0.0, 0.3, math.inf])
def test_constant_schedule_gives_the_same_laws(tau, key):
    delta, h, steps = 0.02, 0.4, 5
    t = delta + (steps - np.arange(steps)) * h  # the DESIGN.md formula, written out
    s = np.maximum(np.append(t[1:], delta) - tau, delta)
    s[-1] = delta
    sched = Schedule.constant(delta=delta, h=h, steps=steps, tau=tau)
    np.testing.assert_allclose(sched.t, t, rtol=0, atol=1e-15)
    np.testing.assert_allclose(sched.s, s, rtol=0, atol=1e-15)
    g = gaussian(3)
    old = mp.sampler_law(g, delta=delta, h=h, steps=steps, tau=tau)
    new = mp.sampler_law(g, schedule=Schedule(t, s))
    np.testing.assert_allclose(new.loc, old.loc, rtol=0, atol=1e-14)
    np.testing.assert_allclose(new.covariance_matrix, old.covariance_matrix, rtol=0, atol=1e-14)
    f = mp.ExactFlow(g)
    a = mp.sample(f, key, 64, dim=3, delta=delta, h=h, steps=steps, tau=tau).samples
    b = mp.sample(f, key, 64, dim=3, schedule=sched).samples
    np.testing.assert_array_equal(a, b)


def test_bad_schedules_are_refused():
    with pytest.raises(ValueError, match="strictly decreasing"):
        Schedule([1.0, 1.0], [0.5, 0.1])
    with pytest.raises(ValueError, match=r"landing time s\[0\] = 0.8 is after the next start"):
        Schedule([1.0, 0.5], [0.8, 0.1])
    with pytest.raises(ValueError, match="below delta"):
        Schedule([1.0, 0.5], [0.05, 0.1])
    with pytest.raises(ValueError, match="must be > 0"):
        Schedule([1.0, 0.5], [0.2, 0.0])
    with pytest.raises(ValueError, match="same length"):
        Schedule([1.0, 0.5], [0.1])
    with pytest.raises(ValueError, match=r"`schedule.t` must be finite"):
        Schedule([math.inf, 0.5], [0.5, 0.1])
    with pytest.raises(ValueError, match="either `schedule` or"):
        mp.sampler_law(gaussian(2), schedule=Schedule([1.0], [0.1]), h=0.1)
    with pytest.raises(ValueError, match="reach"):
        Schedule.halving(T=1.0, delta=0.2, steps=4)
    with pytest.raises(ValueError, match="middle_sigma"):
        Schedule.ect(T=0.2, delta=0.01)


def test_literature_schedules_in_ou_time():
    rho = lambda t: np.sqrt(np.expm1(2 * t))  # noqa: E731
    T, K = 4.0, 5
    k = Schedule.karras(T=T, delta=DELTA, steps=K, tau=math.inf)
    r = rho(np.append(k.t, DELTA)) ** (1 / 7)  # EDM: rho^(1/7) equally spaced from T to delta
    np.testing.assert_allclose(np.diff(r), (r[-1] - r[0]) / K, rtol=1e-10)
    assert k.horizon == T and np.all(k.s == DELTA)  # jump to delta (Algorithm 1)
    g = Schedule.song(T=T, delta=DELTA, steps=K)
    ratios = np.diff(np.log(rho(np.append(g.t, DELTA))))
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-10)
    e = Schedule.ect(T=T, delta=DELTA)
    np.testing.assert_allclose(e.t, [T, 0.5 * math.log1p(0.821**2)], rtol=1e-14)
    np.testing.assert_allclose(Schedule.halving(T=T, delta=DELTA, steps=3).t, [4.0, 2.0, 1.0])
    # one default landing rule for every constructor: tau = 0 lands on the next start time
    for default in (
        Schedule.karras(T=T, delta=DELTA, steps=K),
        Schedule.song(T=T, delta=DELTA, steps=K),
        Schedule.ect(T=T, delta=DELTA),
        Schedule.halving(T=T, delta=DELTA, steps=3),
        Schedule.fixed_horizon(T=T, delta=DELTA, steps=K),
        Schedule.constant(delta=DELTA, h=0.5, steps=K),
        Schedule.from_start_times([2.0, 1.0], delta=DELTA),
    ):
        np.testing.assert_array_equal(default.s, np.append(default.t[1:], DELTA))
    fh = Schedule.fixed_horizon(T=T, delta=DELTA, steps=K, tau=0.5)
    np.testing.assert_allclose(fh.t, DELTA + (T - DELTA) * (K - np.arange(K)) / K, rtol=1e-14)
    np.testing.assert_allclose(fh.gaps, 0.5)


@pytest.mark.heavy(20)
@pytest.mark.parametrize("d", [2, 16])
def test_optimised_schedule_beats_the_constant_step(d):
    g = gaussian(d)
    for k in (2, 3, 4, 6):
        const = Schedule.constant(delta=DELTA, h=0.5, steps=k)
        res = optimal_schedule(g, k, T=const.horizon, delta=DELTA, iterations=200)
        assert res.schedule.horizon == pytest.approx(const.horizon, rel=1e-12)
        assert res.schedule.delta == pytest.approx(DELTA, rel=1e-12)
        assert res.kl == pytest.approx(schedule_kl(g, res.schedule), rel=1e-12)
        assert res.kl <= schedule_kl(g, const)
        # the exact flow preserves KL and re-noising contracts it: restarts near T win by far
        assert res.kl < 0.2 * schedule_kl(g, const)
        assert np.all(np.isfinite(res.history)) and res.history.shape[1] == 200


@pytest.mark.heavy(30)
def test_optimised_schedule_for_a_product_target():
    """A 1-d Dirac mixture in 3 i.i.d. coordinates, optimised on the CDF grid law and checked
    with the ODE grid law: no worse than the constant step or any start, valid, same horizon."""
    dirac = mp.data.DiracMixture([[-1.0], [2.0]], [0.3, 0.7])
    const = Schedule.constant(delta=0.05, h=0.5, steps=2)
    res = optimal_schedule(dirac, 2, T=const.horizon, delta=0.05, dim=3, iterations=60,
                           n_random=1, grid={"n_grid": 1001})  # fmt: skip
    kl_const = product_kl([dirac] * 3, schedule=const, n_grid=1001)
    assert res.kl == pytest.approx(product_kl([dirac] * 3, schedule=res.schedule, n_grid=1001))
    assert res.kl <= min(res.start_kl.min(), kl_const)
    assert res.kl < 0.2 * kl_const and res.schedule.horizon == const.horizon
    assert res.history.shape == (4, 60) and np.all(np.isfinite(res.history))


def test_cdf_grid_law_matches_the_ode_grid_law():
    """The flow through closed-form CDFs (no ODE) against the ODE transport, n_grid = 1001:
    relative 1e-4 for a box and a Gaussian (and the exact value for the Gaussian)."""
    from mcm_prob.gridlaw import grid_kl_cdf, grid_points

    sched = Schedule.constant(delta=0.05, h=0.5, steps=3, tau=0.3)
    t, s = jnp.asarray(sched.t), jnp.asarray(sched.s)
    g = mp.data.Gaussian([0.5], [[2.0]])
    for data in (mp.data.UniformBox([-1.0], [1.5]), g):
        x = jnp.asarray(grid_points(data, 0.05, 1001))
        cdf = float(grid_kl_cdf(data, x, t, s))
        assert cdf == pytest.approx(grid_law_1d(data, schedule=sched, n_grid=1001).kl, rel=1e-4)
    assert cdf == pytest.approx(schedule_kl(g, sched), rel=1e-4)


def test_optimal_schedule_refuses_data_without_an_exact_law():
    with pytest.raises(ValueError, match="exact laws exist for Gaussian data"):
        optimal_schedule(mp.data.DiracMixture([[0.0, 1.0]]), 2, T=2.0, delta=0.05)


@pytest.mark.parametrize("tau", [0.3, math.inf])
def test_grid_law_of_any_f_matches_exact_flow_grid_law(tau):
    """f = the exact flow through the change-of-variables path versus the exact transport:
    Gaussian (closed-form flow, derivatives exact) to 1e-12, Dirac mixture (ODE flow,
    derivatives of the solver) to 1e-4 relative."""
    kw = dict(delta=0.05, h=0.5, steps=3, tau=tau, n_grid=2001)
    g = mp.data.Gaussian([0.5], [[2.0]])
    a, b = grid_law_1d(g, **kw), grid_law_1d(g, f=mp.ExactFlow(g), **kw)
    assert b.transport == ("monotone",) * 3 and a.transport == ("exact",) * 3
    assert b.kl == pytest.approx(a.kl, rel=1e-12)
    dirac = mp.data.DiracMixture([[-1.0], [2.0]], [0.3, 0.7])
    a, b = grid_law_1d(dirac, **kw), grid_law_1d(dirac, f=mp.ExactFlow(dirac), **kw)
    assert b.kl == pytest.approx(a.kl, rel=1e-4)


def test_law_grid_is_the_laws_grid_and_a_net_is_one_compiled_program():
    """`law_grid` places the points `grid_law_1d` places itself (off OU: the same points, the
    same law bit for bit). A net's images and slopes on the grid are one compiled program per
    net structure and grid, the times its arguments: a second net of the same structure on a
    schedule with other times compiles nothing, and its law is that of the same net called
    eagerly through a plain function: KL to 1e-6 relative, density to 1e-6 of its maximum
    (float32 net: the images agree to 1 float32 ulp, measured; in the tails an image moved by
    an ulp changes q relatively by far more, so the density is compared in absolute terms)."""
    vp = mp.paths.VP()
    data = mp.data.DiracMixture([[-1.0], [2.0]], [0.3, 0.7])
    sched = Schedule.constant(delta=0.05, h=0.3, steps=3, tau=0.3)
    points = law_grid(data, sched, n_grid=501, path=vp)
    own = grid_law_1d(data, schedule=sched, n_grid=501, path=vp)
    given = grid_law_1d(data, schedule=sched, grid=points, path=vp)
    np.testing.assert_array_equal(own.x, points)
    np.testing.assert_array_equal(own.q, given.q)
    assert own.kl == given.kl
    first, net = (mp.ConsistencyNet(1, width=16, depth=2, key=jax.random.key(i), path=vp)
                  for i in (0, 1))  # fmt: skip
    grid_law_1d(data, schedule=sched, f=first, grid=points, path=vp)
    compiled = []

    def listener(event, seconds, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(seconds)

    jax.monitoring.register_event_duration_secs_listener(listener)
    sched = Schedule.constant(delta=0.05, h=0.25, steps=3, tau=0.2)  # other times, same delta
    try:
        law = grid_law_1d(data, schedule=sched, f=net, grid=points, path=vp)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiled == []
    eager = grid_law_1d(data, schedule=sched, f=lambda x, t, s: net(x, t, s), grid=points, path=vp)
    assert law.transport == eager.transport
    assert law.kl == pytest.approx(eager.kl, rel=1e-6)
    np.testing.assert_allclose(law.q, eager.q, rtol=0, atol=1e-6 * eager.q.max())


def _bin_z(y, law, edges):
    """Standardised differences of the 10^6-sample bin frequencies from the grid law's."""
    cdf = np.concatenate([[0], np.cumsum(np.diff(law.x) * (law.q[1:] + law.q[:-1]) / 2)])
    p = np.diff(np.interp(edges, law.x, cdf))
    counts, _ = np.histogram(y, edges)
    return (counts / y.size - p) / np.sqrt(p * (1 - p) / y.size)


@pytest.mark.heavy(30)
def test_learned_sampler_grid_law_matches_a_million_samples():
    """A fitted net's sampler law on the grid against a 10^6-sample histogram of `sample`:
    80 bins on [-4, 4], chi^2 below its 99.9% quantile (124.8 for 80 dof), |z| <= 4.5."""
    data = mp.data.GaussianMixture([0.4, 0.6], [[-1.5], [1.0]], [[[0.2]], [[0.3]]])
    cfg = mp.TrainConfig(method="cd", step=0.1, teacher="exact", T=2.05, delta=0.05,
                         iterations=400, width=32, depth=2, progress=False)  # fmt: skip
    net, _ = mp.fit(data, cfg, jax.random.key(0))
    sched = Schedule.constant(delta=0.05, h=0.5, steps=4, tau=0.5)
    law = grid_law_1d(data, schedule=sched, f=net)
    assert law.transport == ("monotone",) * 4
    assert law.mass == pytest.approx(1.0, abs=1e-4)
    y = np.asarray(mp.sample(net, jax.random.key(1), 10**6, dim=1, schedule=sched).samples)[:, 0]
    z = _bin_z(y, law, np.linspace(-4, 4, 81))
    assert np.sum(z**2) < 124.8 and np.max(np.abs(z)) < 4.5
    assert law.kl > 100 * grid_law_1d(data, schedule=sched).kl  # the net's error is visible


def test_mass_transport_for_a_non_monotone_f():
    g = mp.data.Gaussian([0.0], [[1.0]])
    exact = mp.ExactFlow(g)
    f = lambda x, t, s: exact(x, t, s) + 0.4 * jnp.sin(6 * x) * (t - s)  # noqa: E731
    sched = Schedule.constant(delta=0.05, h=0.6, steps=2, tau=0.3)
    law = grid_law_1d(g, schedule=sched, f=f, n_grid=4001)
    assert "mass" in law.transport
    y = np.asarray(mp.sample(f, jax.random.key(2), 10**6, dim=1, schedule=sched).samples)[:, 0]
    z = _bin_z(y, law, np.linspace(-4, 4, 81))
    assert np.sum(z**2) < 124.8 and np.max(np.abs(z)) < 4.5


def test_product_grid_law_with_a_coordinatewise_f():
    g2 = mp.data.Gaussian([0.5, -1.0], [[2.0, 0.0], [0.0, 0.5]])
    sched = Schedule.karras(T=2.0, delta=DELTA, steps=3)
    maps = coordinate_maps(mp.ExactFlow(g2), 2, sched)
    factors = [mp.data.Gaussian([0.5], [[2.0]]), mp.data.Gaussian([-1.0], [[0.5]])]
    kl = product_kl(factors, f=maps, schedule=sched)
    assert kl == pytest.approx(product_kl(factors, schedule=sched), rel=1e-10)
    # the grid quadrature itself: 4e-9 absolute at KL = 8.5e-4 on this schedule
    assert kl == pytest.approx(schedule_kl(g2, sched), rel=1e-5)
    rot = mp.data.Gaussian([0.0, 0.0], [[1.0, 0.5], [0.5, 1.0]])
    with pytest.raises(ValueError, match="not coordinate-wise"):
        coordinate_maps(mp.ExactFlow(rot), 2, sched)


def test_steps_to_accuracy_says_why():
    g = gaussian(2)
    ode = steps_to_accuracy(g, 1e-3, sampler="ode_heun", delta=DELTA, T=1.0, max_steps=64)
    assert ode["steps"] is None and ode["start_kl"] > 1e-6
    assert "start error" in ode["reason"] and "cannot reduce" in ode["reason"]
    const = steps_to_accuracy(g, 1e-3, delta=DELTA, h=0.01, max_steps=8)
    assert const["steps"] is None and const["start_kl"] is None
    assert const["reason"].startswith("max_steps = 8 ran out")
    ok = steps_to_accuracy(
        g,
        1e-2,
        delta=DELTA,
        schedule=lambda k: Schedule.karras(T=4.0, delta=DELTA, steps=k, tau=math.inf),
    )
    assert ok["reason"] is None and ok["kl"] <= 1e-4
    assert ok["start_kl"] == pytest.approx(
        mp.metrics.kl_gaussian(
            mp.sampler_law(g, schedule=Schedule([4.0], [DELTA])), g.marginal(DELTA)
        )
    )
    with pytest.raises(FloatingPointError, match="not a finite number"):
        mp.accuracy.smallest_steps(lambda k: math.nan, 0.1)


@pytest.mark.heavy(30)
def test_schedules_study_and_cli(tmp_path, capsys, undescribed):
    from mcm_prob import cli
    from mcm_prob.results import load_tree

    cfg_file = tmp_path / "s.toml"
    cfg_file.write_text(
        "[schedules]\nsteps = [1, 2, 3]\niterations = 40\nn_random = 1\nn_grid = 201\n"
        "errors = [0.0, 0.05]\neps = [0.1, 0.001]\noptimise_products = false\n"
        '[schedules.data.g2]\nfamily = "gaussian"\nmean = [0.5, 0.0]\ncov = [[0.5, 0.2], [0.2, 2.0]]\n'
        '[schedules.data.box1]\nfamily = "uniform_box"\nlow = [-1.0]\nhigh = [1.0]\n'
    )
    out = tmp_path / "s.nc"
    argv = ["run", "schedules", "--config", str(cfg_file), "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    tree = load_tree(out)
    assert undescribed(tree) == []
    res = tree["results"].to_dataset()
    g = mp.data.Gaussian([0.5, 0.0], [[0.5, 0.2], [0.2, 2.0]])
    kl = res["kl"].sel(entry="g2", error=0.0)
    for k in (1, 2, 3):  # every stored KL is the exact law's on the named schedule
        const = Schedule.constant(delta=DELTA, h=0.5, steps=k)
        karras = Schedule.karras(T=4.0, delta=DELTA, steps=k, tau=math.inf)
        assert float(kl.sel(schedule="constant", steps=k)) == schedule_kl(g, const)
        assert float(kl.sel(schedule="karras", steps=k)) == schedule_kl(g, karras)
        assert float(kl.sel(schedule="optimal_growing", steps=k)) <= schedule_kl(g, const)
    assert np.isnan(kl.sel(schedule="ect", steps=3)) and np.isfinite(
        kl.sel(schedule="ect", steps=2)
    )
    # stored optimal times rebuild a schedule with the stored KL
    t = res["optimal_t"].sel(entry="g2", error=0.05, horizon_kind="T", steps=3).values
    s = res["optimal_s"].sel(entry="g2", error=0.05, horizon_kind="T", steps=3).values
    pert = (0.05 * np.eye(2), 0.05 * np.ones(2))
    assert schedule_kl(g, Schedule(t, s), perturbation=pert) == pytest.approx(
        float(res["kl"].sel(entry="g2", error=0.05, schedule="optimal", steps=3)), rel=1e-12
    )
    # boxes: grid laws, no injected error, optimiser switched off here
    box = res["kl"].sel(entry="box1")
    assert np.all(np.isnan(box.sel(schedule="optimal"))) and np.all(np.isnan(box.sel(error=0.05)))
    assert np.isfinite(box.sel(error=0.0, schedule="karras")).all()
    # not reached -> a reason; reached -> none
    reached = np.isfinite(res["steps_to_eps"].values)
    assert np.all((res["reason"].values == "") == reached)
    gain = tree["gain"].to_dataset()["gain"].sel(entry="g2", error=0.0)
    assert float(gain.sel(steps=3)) > 10
    assert cli.main(["report", str(out)]) == 0
    text = capsys.readouterr().out
    assert "gain of the optimised schedule" in text and "not reached" in text
    with pytest.raises(ValueError, match="data.dirac.*needs exact sampler laws"):
        mp.studies.SchedulesConfig(data={"dirac": {"family": "dirac_mixture", "atoms": [[0.0]]}})


def test_start_error_needs_only_the_horizon():
    """KL(prior || p_T) from the horizon alone: the closed form for Gaussian data on OU and VE
    (prior N(0, T^2 I)), and for a box the grid law equal to the one-step exact-flow sampler's
    KL to p_delta (the flow preserves KL; both are grid quadratures, 1e-5)."""
    from mcm_prob.accuracy import start_error

    g = gaussian(2)
    for path, T in ((mp.OU, 1.0), (mp.paths.VE(), 3.0)):
        prior = mp.data.Gaussian(np.zeros(2), float(path.prior_std(T)) ** 2 * np.eye(2))
        want = mp.metrics.kl_gaussian(prior.marginal(0.0, mp.paths.VE()), g.marginal(T, path))
        assert start_error(g, T, path=path) == pytest.approx(want, rel=1e-12)
    box = mp.data.UniformBox([-1.0, -1.0], [1.0, 2.0])
    assert start_error(box, 1.0) == pytest.approx(
        schedule_kl(box, Schedule([1.0], [0.05])), rel=1e-5
    )
    with pytest.raises(ValueError, match="`T`"):
        start_error(g, -1.0)
