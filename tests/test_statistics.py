"""Rate analysis: recovery of a known rate, interval coverage, and agreement of the methods."""

import numpy as np
import pytest
import xarray as xr

from mcm_prob.statistics import (
    bootstrap_rates,
    compare_error_models,
    fit_error_model,
    fit_error_models,
)

STEPS = np.array([0.025, 0.05, 0.1, 0.2, 0.4])


def synthetic(alphas, *, n_seed=8, noise=0.15, seed_sd=0.1, rng):
    """err = C step^alpha * exp(seed effect + noise): log-linear with a known alpha per regime."""
    log_c = np.array([0.5, -1.0])[: len(alphas)]
    u = seed_sd * rng.normal(size=(len(alphas), 1, n_seed))
    eps = noise * rng.normal(size=(len(alphas), STEPS.size, n_seed))
    loge = (
        log_c[:, None, None]
        + np.asarray(alphas)[:, None, None] * np.log(STEPS)[None, :, None]
        + u
        + eps
    )
    return xr.DataArray(
        np.exp(loge),
        dims=("entry", "step", "seed"),
        coords={
            "entry": ["smooth", "nonsmooth"][: len(alphas)],
            "step": STEPS,
            "seed": np.arange(n_seed),
        },
    )


def test_bootstrap_recovers_rate_and_covers():
    """Over 100 synthetic studies (alpha = 2 and 1), the 90% percentile intervals cover the true
    alpha in at least 80% of studies per regime (binomial 5th percentile of 90% coverage at
    n = 100 is 85%; 80% leaves room for the percentile bootstrap's small-sample undercoverage
    with 8 seeds), and the point estimates are unbiased within 0.05."""
    rng = np.random.default_rng(1)
    hits, est = np.zeros(2), []
    for rep in range(100):
        res = bootstrap_rates(synthetic([2.0, 1.0], rng=rng), n_boot=500, seed=rep)
        hits += (res["alpha_low"].values <= [2.0, 1.0]) & ([2.0, 1.0] <= res["alpha_high"].values)
        est.append(res["alpha"].values)
    assert np.all(hits >= 80)
    assert np.all(np.abs(np.mean(est, 0) - [2.0, 1.0]) < 0.05)


def test_bootstrap_outputs_and_bad_input():
    data = synthetic([2.0, 1.0], rng=np.random.default_rng(0))
    res = bootstrap_rates(data, n_boot=300)
    assert res["alpha_boot"].shape == (2, 300)
    assert np.all(res["mean_error_low"] <= res["mean_error"]) and np.all(
        res["mean_error"] <= res["mean_error_high"]
    )
    assert "percentile" in res.attrs["method"]
    bad = data.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="finite and > 0"):
        bootstrap_rates(bad)
    with pytest.raises(ValueError, match="needs dims"):
        bootstrap_rates(data.rename(seed="rep"))
    with pytest.raises(ValueError, match="`ci` must be a finite number > 0 and < 1"):
        bootstrap_rates(data, ci=1.5)
    steps = data["step"].values
    for bad_steps in (np.r_[0.0, steps[1:]], np.r_[steps[1], steps[1:]]):  # zero, repeated
        with pytest.raises(ValueError, match="distinct finite values > 0"):
            bootstrap_rates(data.assign_coords(step=bad_steps))


def two_term_errors(n_rep, *, rng, p=2.0, q=1.0, delta_star=0.08, noise=0.1, seed_sd=0.1):
    """n_rep replicated studies (dim `rep`) from e = A step^p + B step^-q with A = 1 and B set
    so that the error is minimal at `delta_star`: B = p A delta_star^(p+q) / q."""
    b = p * delta_star ** (p + q) / q
    m = np.log(STEPS**p + b * STEPS**-q)
    u = seed_sd * rng.normal(size=(n_rep, 1, 8))
    y = m[None, :, None] + u + noise * rng.normal(size=(n_rep, STEPS.size, 8))
    errors = xr.DataArray(
        np.exp(y),
        dims=("rep", "step", "seed"),
        coords={"rep": np.arange(n_rep), "step": STEPS, "seed": np.arange(8)},
    )
    x = np.log(STEPS)
    truth = {
        "p": p,
        "q": q,
        "delta_star": delta_star,
        "rate_small": (m[1] - m[0]) / (x[1] - x[0]),
        "rate_large": (m[-1] - m[-2]) / (x[-1] - x[-2]),
    }
    return errors, truth


def _covered(low, high, truth):
    return int(np.sum((np.asarray(low) <= truth) & (truth <= np.asarray(high))))


@pytest.mark.heavy(130)
def test_calibration_two_term_truth():
    """60 replicated studies from a known two-term truth (p = 2, q = 1, Delta* = 0.08), fitted
    as 60 groups of one model. The 90% posterior intervals (equal-tailed) cover the truth in
    at least 47 of 60 (binomial(60, 0.9) gives P(X <= 46) = 0.2%), the percentile bootstrap's
    at its own small-sample rate (below); the true model passes its predictive check almost everywhere and PSIS-LOO ranks it first,
    the single power law is rejected by its predictive check in most replications, and the
    LOO-PIT shows where it misses."""
    n_rep = 60
    errors, truth = two_term_errors(n_rep, rng=np.random.default_rng(8))
    fits = {
        m: fit_error_model(errors, m, chains=4, warmup=300, draws=250, seed=1, min_ess=200)
        for m in ("power_law", "two_term")
    }
    post = fits["two_term"]["posterior"].to_dataset()
    for name in ("p", "q", "delta_star", "rate_small", "rate_large"):
        lo, hi = post[name].quantile([0.05, 0.95], ("chain", "draw")).values
        assert _covered(lo, hi, truth[name]) >= 47, name
    # the percentile bootstrap of a mean over J = 8 seeds is too narrow by sqrt(7/8) and uses
    # normal instead of t_7 quantiles: its 90% interval covers with probability
    # P(|t_7| < 1.645 sqrt(7/8)) = 0.832; binomial(60, 0.832) gives P(X <= 42) = 0.8%
    boot = bootstrap_rates(errors, n_boot=1000)
    for name in ("rate_small", "rate_large"):
        assert _covered(boot[name + "_low"], boot[name + "_high"], truth[name]) >= 43, name
    assert (~fits["two_term"]["checks"]["ppc_rejected"].values).mean() >= 0.9
    assert fits["power_law"]["checks"]["ppc_rejected"].values.mean() >= 0.9
    comparison = compare_error_models(fits)
    assert comparison["rank"].sel(model="two_term") == 0
    assert float(comparison["elpd_diff"].sel(model="power_law")) > 4 * float(
        comparison["dse"].sel(model="power_law")
    )
    by_group = comparison["elpd_group"]
    assert (by_group.sel(model="two_term") > by_group.sel(model="power_law")).mean() >= 0.9
    # leave-one-seed-out LOO-PIT: about 0.5 at every step for the true model; for the straight
    # line, high at both ends and low in the middle (the curve it misses). The stored values
    # equal plain importance sampling (numpy, weights 1 / p(y_j | theta)) up to Pareto smoothing.
    pit = {m: fits[m]["loo_pit"]["log_error"].mean(("rep", "seed")) for m in fits}
    assert np.all(np.abs(pit["two_term"] - 0.5) < 0.06), pit["two_term"].values
    assert np.all(pit["power_law"][[0, -1]] > 0.75) and pit["power_law"][2] < 0.2
    for fit in fits.values():
        loglik = fit["log_likelihood"]["log_error"].stack(n=("chain", "draw"))
        y_rep = fit["posterior_predictive"]["log_error"].stack(n=("chain", "draw"))
        w = np.exp(-loglik + loglik.min("n"))
        raw = ((y_rep <= fit["observed_data"]["log_error"]) * w).sum("n") / w.sum("n")
        assert float(abs(raw - fit["loo_pit"]["log_error"]).mean()) < 0.005


@pytest.mark.heavy(40)
def test_straight_line_truth_is_kept():
    """A straight-line truth (alpha = 1.5): the power law passes its predictive check in at
    least 26 of 30 replications (a correct model is rejected with probability <= 5%:
    P(>= 5 of 30) = 1.6%), and its 90% interval covers the true exponent in at least 23 of 30
    (binomial(30, 0.9): P(X <= 23) = 2.6%)."""
    rng = np.random.default_rng(11)
    reps = [synthetic([1.5], rng=rng).isel(entry=0, drop=True) for _ in range(30)]
    errors = xr.concat(reps, "rep")
    fit = fit_error_model(errors, "power_law", chains=4, warmup=300, draws=250, seed=2, min_ess=200)
    checks = fit["checks"].to_dataset()
    assert int((~checks["ppc_rejected"]).sum()) >= 26
    lo, hi = fit["posterior"]["alpha"].quantile([0.05, 0.95], ("chain", "draw")).values
    assert _covered(lo, hi, 1.5) >= 23


@pytest.mark.heavy(30)
def test_error_model_file_is_arviz_native(tmp_path):
    """A fitted model saved in a study-like file: `arviz_stats.loo`, `compare`, `summary`,
    `ess` and `rhat` run on the stored groups as they are, booleans come back as booleans
    with plain xarray, and the local rate of a power law equals its alpha."""
    import arviz_stats

    from mcm_prob.results import save_tree

    data = synthetic([2.0, 1.0], rng=np.random.default_rng(3))
    groups = {}
    for m in ("power_law", "gp"):
        for node in fit_error_model(data, m, chains=2, warmup=200, draws=200).subtree:
            groups[f"/error_models/{m}" + ("" if node.path == "/" else node.path)] = (
                node.to_dataset()
            )
    save_tree(xr.DataTree.from_dict(groups), tmp_path / "f.nc")
    tree = xr.open_datatree(tmp_path / "f.nc", engine="h5netcdf")
    pl, sm = tree["error_models/power_law"], tree["error_models/gp"]
    assert tree["error_models/power_law/sample_stats"]["diverging"].dtype == bool
    assert tree["error_models/power_law/checks"]["usable"].dtype == bool
    loo = arviz_stats.loo(pl)
    assert loo.n_data_points == 2 * 8 and np.isfinite(loo.elpd)  # one point per seed curve
    table = arviz_stats.compare({"power_law": pl, "gp": sm})
    assert set(table.index) == {"power_law", "gp"}
    summary = arviz_stats.summary(pl, var_names=["alpha"])
    assert len(summary) == 2
    assert float(arviz_stats.rhat(pl, var_names=["alpha"])["alpha"].max()) < 1.05
    assert float(arviz_stats.ess(pl, var_names=["alpha"])["alpha"].min()) > 50
    post = pl["posterior"].to_dataset()
    np.testing.assert_allclose(
        post["local_rate"].values,
        np.broadcast_to(post["alpha"].values[..., None], post["local_rate"].shape),
        atol=1e-6,
    )


def test_error_model_bad_input():
    data = synthetic([2.0], rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="`model` must be one of"):
        fit_error_model(data, "cubic")
    with pytest.raises(ValueError, match="at least 3 steps"):
        fit_error_model(data.isel(step=[0, 1]))
    with pytest.raises(ValueError, match="`chains` must be an integer >= 2"):
        fit_error_model(data, chains=1)
    bad = data.copy()
    bad[0, 0, 0] = -1.0
    with pytest.raises(ValueError, match="finite and > 0"):
        fit_error_model(bad)
    with pytest.raises(ValueError, match="at least 2 models"):
        compare_error_models(data, models=["power_law"])


@pytest.mark.heavy(60)
def test_error_models_in_threads_equal_one_by_one_and_groups_alone():
    """`fit_error_models` (traced in turn, compiled and run in 2 threads) returns the fits of
    `fit_error_model` one after the other, number for number; and each group is its own
    posterior: a group fitted alone (kept as a size-1 dim, or selected to a scalar
    coordinate) gets exactly the draws it gets among the others, for every model."""
    data = synthetic([2.0, 1.0], rng=np.random.default_rng(5))
    kw = dict(chains=2, warmup=100, draws=100, seed=4)
    together = fit_error_models(data, workers=2, **kw)
    assert list(together) == ["power_law", "two_term", "gp"]
    assert together["gp"].attrs["error_model"] == "gp"
    for m, fit in together.items():
        assert fit["sample_stats"]["diverging"].dims == ("chain", "draw", "entry")
        alone = fit_error_model(data, m, **kw)
        for group in ("posterior", "log_likelihood", "checks"):
            xr.testing.assert_identical(fit[group].to_dataset(), alone[group].to_dataset())
        for pick in ({"entry": ["nonsmooth"]}, {"entry": "nonsmooth"}):
            one = fit_error_model(data.sel(pick), m, **kw)["posterior"]
            for name in ("sigma", "tau", "nu", "local_rate"):
                np.testing.assert_array_equal(
                    one[name].values, fit["posterior"][name].sel(pick).values
                )
    # groups are independent: two groups with equal data along a dim without a coordinate
    # (keys from the position) get different random numbers, hence different draws
    twice = xr.concat([data.isel(entry=0, drop=True)] * 2, "copy")
    sigma = fit_error_model(twice, "power_law", **kw)["posterior"]["sigma"]
    assert not np.array_equal(sigma.isel(copy=0).values, sigma.isel(copy=1).values)
    with pytest.raises(ValueError, match="`models` must be one of"):
        fit_error_models(data, ("power_law", "cubic"), workers=2)
    with pytest.raises(ValueError, match="`workers` must be an integer >= 1"):
        fit_error_models(data, workers=0)


def test_error_model_stages_overlap(monkeypatch):
    """`fit_error_models` overlaps its stages (the draws stay those of one model at a time,
    above): the slowest model (two-term) runs while the next one is traced, and a model's
    checks run as soon as its run ends, while two-term still runs. Checked on the order of
    events, with NumPyro's tracing, compiling and sampling replaced by stand-ins that wait (at
    most 60 s) for the event that must come first."""
    import threading
    from types import SimpleNamespace

    from mcm_prob import error_models as em

    running, checked, events = threading.Event(), threading.Event(), []
    program = SimpleNamespace(compile=lambda: None)

    def plan(errors, model, options, device):
        events.append(("traced", model))
        assert model == "two_term" or running.wait(60), f"{model} traced before two-term ran"
        return SimpleNamespace(programs=(program, program), model=model)

    def draws(run, tick):
        events.append(("ran", run.model))
        if run.model == "two_term":
            running.set()
            assert checked.wait(60), "no model was checked while two-term ran"
            events.append(("ended", run.model))

    class Run(SimpleNamespace):
        def tree(self):
            events.append(("checked", self.model))
            checked.set()
            return SimpleNamespace(attrs={})

    monkeypatch.setattr(em, "_plan", plan)
    monkeypatch.setattr(em, "_start", lambda plan, *programs: Run(model=plan.model))
    monkeypatch.setattr(em._Run, "draws", draws)
    monkeypatch.setattr(em, "_unconverged", lambda fit: False)
    fits = fit_error_models(synthetic([2.0, 1.0], rng=np.random.default_rng(5)))
    assert list(fits) == ["power_law", "two_term", "gp"]
    assert events.index(("ran", "two_term")) < events.index(("traced", "gp"))
    first_check = next(e for e in events if e[0] == "checked")
    assert first_check[1] != "two_term"
    assert events.index(first_check) < events.index(("ended", "two_term"))
    assert events[-1] == ("checked", "two_term")


def test_rank_diagnostics_equal_arviz_stats_bit_for_bit():
    """`mcm_prob._diagnostics.rank_diagnostics` (all elements at once) gives arviz-stats's
    rank-normalised split R-hat and bulk ESS, element by element, to the last bit: chains
    that mix well, that are strongly and negatively autocorrelated (odd draw count), that
    disagree in location, with ties, heavy tails, constant elements, a NaN, one chain, and
    too few draws."""
    import arviz_stats  # noqa: F401  (the .azstats accessor)

    from mcm_prob._diagnostics import rank_diagnostics

    rng = np.random.default_rng(11)

    def ar1(shape, phi):
        x, noise = np.zeros(shape), rng.normal(size=shape)
        for t in range(1, shape[-1]):
            x[..., t] = phi * x[..., t - 1] + noise[..., t]
        return x

    cases = [
        rng.normal(size=(40, 4, 400)),
        ar1((30, 4, 300), 0.95),
        ar1((30, 4, 301), -0.7),
        rng.normal(size=(20, 4, 100)) + 0.3 * np.arange(4)[None, :, None],
        rng.integers(0, 3, size=(20, 4, 64)).astype(float),
        rng.standard_cauchy(size=(20, 4, 500)),
        np.concatenate([np.ones((2, 4, 100)), rng.normal(size=(3, 4, 100))]),
        np.where(rng.random((6, 4, 50)) < 0.01, np.nan, rng.normal(size=(6, 4, 50))),
        rng.normal(size=(5, 1, 100)),
        rng.normal(size=(10, 2, 7)),
        rng.normal(size=(3, 4, 3)),
        rng.normal(size=(70, 4, 20)),  # more rows than one block
    ]
    for a in cases:
        da = xr.DataArray(a, dims=("element", "chain", "draw"))
        with np.errstate(divide="ignore", invalid="ignore"):
            want_r = da.azstats.rhat().values
            want_e = da.azstats.ess(method="bulk").values
        r_hat, ess = rank_diagnostics(a)
        np.testing.assert_array_equal(r_hat, want_r)
        np.testing.assert_array_equal(ess, want_e)
    with pytest.raises(ValueError, match=r"expected an array \(element, chain, draw\)"):
        rank_diagnostics(np.zeros((4, 100)))


@pytest.mark.heavy(80)
def test_refits_until_reported_quantities_converge():
    """Too few draws for the rule: the chains are continued to twice their length (the
    history says so; the first draws are kept), and where a group is usable every quantity reported from it has
    r_hat <= 1.01 and bulk ESS >= min_ess by arviz-stats on the returned posterior, not only
    the parameters. With refits=0 the first fit is returned as it is."""
    import arviz_stats

    from mcm_prob.error_models import R_HAT_MAX

    data = synthetic([2.0, 1.0], rng=np.random.default_rng(7))
    kw = dict(chains=4, warmup=50, draws=25, seed=3, min_ess=100)
    first = fit_error_model(data, "power_law", refits=0, **kw)
    assert first.attrs["refits"] == 0 and first["posterior"].sizes["draw"] == 25
    assert not first["checks"]["usable"].values.any()
    assert "r_hat" in str(first["checks"]["reason"].values[0])
    fit = fit_error_model(data, "power_law", refits=4, **kw)
    n = fit.attrs["refits"]
    assert n >= 1 and fit["posterior"].sizes["draw"] == 25 * 2**n
    # the chains were continued: the first fit's draws are the first 25 of each chain
    xr.testing.assert_identical(
        fit["posterior"].to_dataset().isel(draw=slice(25)).drop_vars("draw"),
        first["posterior"].to_dataset().drop_vars("draw"),
    )
    history = fit.attrs["refit_history"]
    assert history.startswith("fitted with 25 draws after 50 warm-up")
    assert f"chains continued to {25 * 2**n} draws" in history
    usable = fit["checks"]["usable"].values
    assert usable.any()
    post = fit["posterior"].to_dataset()
    reported = ["local_rate", "rate_small", "rate_large", "error_min", "alpha", "c"]
    r_hat = arviz_stats.rhat(post, var_names=reported)
    ess = arviz_stats.ess(post, var_names=reported, method="bulk")
    for name in reported:
        other = [d for d in r_hat[name].dims if d != "entry"]
        assert (r_hat[name].max(other).values[usable] <= R_HAT_MAX).all(), name
        assert (ess[name].min(other).values[usable] >= 100).all(), name
    # the stored r_hat_max covers the reported quantities: never below any of theirs
    worst = max(float(r_hat[v].max()) for v in reported)
    assert float(fit["checks"]["r_hat_max"].max()) >= worst - 1e-12


def test_seed_curve_law_equals_numpyro_multivariate_t():
    """The closed-form law of a seed's log-error curve (scale sigma^2 I + tau^2 1 1^T) has
    NumPyro's MultivariateStudentT log density to round-off, and its draws that law's mean
    and covariance nu / (nu - 2) Sigma (4 standard errors, 200,000 draws, fixed key)."""
    import jax
    import jax.numpy as jnp
    import numpyro.distributions as dist

    from mcm_prob.error_models import _SeedCurveLaw

    rng = np.random.default_rng(3)
    s = 5
    loc = rng.normal(size=(3, s))
    sigma, tau, nu = np.array([0.3, 0.5, 1.2]), np.array([0.05, 0.7, 2.0]), np.array([3.0, 8, 60])
    y = rng.normal(size=(4, 3, s)) * 3
    cov = sigma[:, None, None] ** 2 * np.eye(s) + tau[:, None, None] ** 2 * np.ones((s, s))
    ref = dist.MultivariateStudentT(nu, loc, jnp.linalg.cholesky(cov)).log_prob(y)
    law = _SeedCurveLaw(nu, jnp.asarray(loc), sigma, tau)
    np.testing.assert_allclose(law.log_prob(y), ref, rtol=1e-13, atol=1e-13)
    draws = np.asarray(law.sample(jax.random.key(0), (200_000,)))
    k = 2  # nu = 60: finite fourth moments, so the covariance's standard error is known
    np.testing.assert_allclose(
        draws.mean(0)[k], loc[k], atol=4 * np.sqrt(cov[k, 0, 0] * 60 / 58 / 200_000)
    )
    emp = np.cov(draws[:, k].T)
    se = 4 * np.sqrt(2 / 200_000) * (cov[k] * 60 / 58).max() * 1.2
    np.testing.assert_allclose(emp, cov[k] * 60 / 58, atol=se)


def test_old_names_are_read():
    """Files of earlier versions: the GP model was called `smooth` and the curve band's
    variables `low`, `median` (shadowed by `Dataset.median`), `high`."""
    from mcm_prob.error_models import curve_quantiles, model_name

    assert model_name("models", "smooth") == "gp" and model_name("models", "gp") == "gp"
    with pytest.raises(ValueError, match="`models` must be one of"):
        model_name("models", "cubic")
    old = xr.Dataset(
        {k: ("step_grid", np.arange(3.0) + i) for i, k in enumerate(("low", "median", "high"))}
    )
    new = curve_quantiles(old)
    assert list(new.data_vars) == ["q05", "q50", "q95"]
    np.testing.assert_array_equal(new["q50"], old["median"])
    xr.testing.assert_identical(curve_quantiles(new), new)
