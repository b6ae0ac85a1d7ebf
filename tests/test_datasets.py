"""Real data (issue 27): the digits as an empirical measure and as a fitted Gaussian, their
exact scores and flows against independent numpy/scipy computations, specs that name the data
set, the memorisation measure and the image grids."""

import json
import sys

import numpy as np
import pytest
from scipy import integrate
from scipy.special import softmax

import mcm_prob as mp
from mcm_prob.data import DiracMixture, Gaussian

X = mp.datasets.digits_array()  # (1797, 64) in [-1, 1]
SUBSET = X[::9]  # 200 atoms: more than the 64 above which the Gram form is used


def numpy_score(atoms, x, a, b):
    """grad log of (1/K) sum_k N(a x_k, b^2 I) at x, by direct differences (float64)."""
    diff = x[:, None, :] - a * atoms[None]  # (n, K, d)
    resp = softmax(-np.sum(diff**2, -1) / (2 * b**2), axis=1)
    return -np.einsum("nk,nkd->nd", resp, diff) / b**2


@pytest.mark.parametrize("path", ["ou", "ve", "linear"])
@pytest.mark.parametrize("t_frac", [0.003, 0.3, 0.9])
def test_empirical_score_equals_numpy(path, t_frac):
    path = mp.paths.from_spec(path)
    t = t_frac * min(path.t_max, 4.0)
    data = DiracMixture.from_samples(SUBSET)
    rng = np.random.default_rng(0)
    a, b = float(path.a(t)), float(path.b(t))
    # points near the atoms (where the responsibilities are sharp) and far from them
    x = np.concatenate([a * SUBSET[:20] + b * rng.normal(size=(20, 64)), rng.normal(size=(5, 64))])
    got = np.asarray(data.score(x, t, path=path))
    want = numpy_score(SUBSET, x, a, b)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * np.abs(want).max())


def test_empirical_flow_map_equals_scipy_ode():
    """Phi_{t->s} of the empirical measure on OU against scipy's DOP853 on the PF-ODE
    dx/dt = -x - score_t(x) with the numpy score, backwards from t = 1 to s = 0.05."""
    data = DiracMixture.from_samples(SUBSET)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 64))
    t, s = 1.0, 0.05

    def field(tau, y):
        a, b = np.exp(-tau), np.sqrt(-np.expm1(-2 * tau))
        return -y - numpy_score(SUBSET, y[None], a, b)[0]

    want = np.stack(
        [
            integrate.solve_ivp(field, (t, s), xi, "DOP853", rtol=1e-11, atol=1e-11).y[:, -1]
            for xi in x
        ]
    )
    got = np.asarray(mp.flow_map(data, x, t, s))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)


def test_gaussian_fit_is_numpys_mean_and_covariance():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(40, 5)) @ rng.normal(size=(5, 5))
    fit = Gaussian.fit(x)
    assert fit.regime == "smooth"
    np.testing.assert_allclose(np.asarray(fit.mean), x.mean(0), rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(np.asarray(fit.cov), np.cov(x, rowvar=False), rtol=1e-12, atol=1e-13)
    # rank-deficient data: exactly singular (non-smooth) unless a floor is given
    low_rank = rng.normal(size=(30, 2)) @ rng.normal(size=(2, 4))
    assert Gaussian.fit(low_rank).regime == "nonsmooth"
    floored = Gaussian.fit(low_rank, min_eigenvalue=1e-3)
    assert floored.regime == "smooth" and float(floored.eigvals.min()) == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="`x` must have shape \\(n, dim\\) with n >= 2"):
        Gaussian.fit(x[:1])
    with pytest.raises(ValueError, match="`min_eigenvalue`"):
        Gaussian.fit(x, min_eigenvalue=-1.0)


def test_digits_both_kinds_and_their_specs():
    emp = mp.datasets.digits()
    assert (emp.dim, emp.regime, emp.atoms.shape) == (64, "nonsmooth", (1797, 64))
    assert isinstance(emp, DiracMixture) and mp.datasets.image_shape(emp) == (8, 8)
    np.testing.assert_array_equal(np.asarray(emp.atoms), X)
    assert (
        X.min() == -1.0 and X.max() == 1.0 and np.array_equal(np.unique(8 * (X + 1)), np.arange(17))
    )
    gauss = mp.datasets.digits("gaussian", scale=2.0, train=1500)
    assert isinstance(gauss, Gaussian) and gauss.regime == "smooth"
    # the covariance is numpy's of the first 1500 images, eigenvalues floored at 1e-4 scale^2
    want = np.cov(2 * X[:1500], rowvar=False)
    lam = np.linalg.eigvalsh(want)
    np.testing.assert_allclose(
        np.sort(np.asarray(gauss.eigvals)), np.maximum(lam, 4e-4), atol=1e-12
    )
    assert np.abs(np.asarray(gauss.cov) - want).max() <= 4e-4 + 1e-12
    np.testing.assert_allclose(np.asarray(gauss.mean), 2 * X[:1500].mean(0), atol=1e-14)
    # specs name the set (no 1797 x 64 numbers) and rebuild the same data, hash checked
    spec = gauss.to_spec()
    assert spec["dataset"] == "digits" and len(str(spec)) < 300
    assert spec["sha256"] == mp.datasets.digits().to_spec()["sha256"]
    again = mp.data.rebuild(mp.data.describe(gauss))
    np.testing.assert_array_equal(np.asarray(again.cov), np.asarray(gauss.cov))
    np.testing.assert_array_equal(np.asarray(mp.data.from_spec(emp.to_spec()).atoms), X)
    with pytest.raises(ValueError, match="the digits on this machine hash to"):
        mp.data.from_spec(spec | {"sha256": "0" * 64})
    with pytest.raises(ValueError, match="unknown key\\(s\\) \\['colour'\\]"):
        mp.data.from_spec({"dataset": "digits", "colour": 1})
    with pytest.raises(ValueError, match="'dataset' must be one of \\['digits'\\]"):
        mp.data.from_spec({"dataset": "mnist"})
    with pytest.raises(ValueError, match="`kind` must be one of"):
        mp.datasets.digits("smooth")
    with pytest.raises(ValueError, match="`train` must be <= 1797"):
        mp.datasets.digits(train=2000)
    # the exact sampler law of the fitted Gaussian at d = 64: KL to p_delta falls with K
    kls = [
        mp.metrics.kl_gaussian(
            mp.sampler_law(gauss, delta=0.01, h=0.5, steps=k), gauss.marginal(0.01)
        )
        for k in (2, 8)
    ]
    assert kls[1] < kls[0] / 10


def test_digits_without_scikit_learn_name_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"pip install 'mcm_prob\[datasets\]'"):
        mp.datasets.digits()


def test_memorisation_is_one_for_new_images_and_zero_for_the_exact_flow():
    rng = np.random.default_rng(3)
    order = rng.permutation(len(X))
    train, held_out = X[order[:1500]], X[order[1500:]]
    new = mp.metrics.memorisation(held_out, train)
    # 297 held-out images: ~1 within a few standard errors (1 in expectation up to K vs K - 1)
    assert abs(new.value - 1.0) < max(4 * new.stderr, 0.1), new
    # the exact flow of the empirical measure from p_T to s = 1e-8 returns training images
    data = DiracMixture.from_samples(train)
    x = rng.normal(size=(64, 64))
    out = np.asarray(mp.flow_map(data, x, 8.0, 1e-8))
    copies = mp.metrics.memorisation(out, train)
    assert copies.value < 1e-3, copies
    # a grid of sample sets gives one estimate each, equal to one at a time
    both = mp.metrics.memorisation(np.stack([held_out[:64], out]), train)
    assert both.value.shape == (2,)
    assert both.value[0] == pytest.approx(
        mp.metrics.memorisation(held_out[:64], train).value, rel=1e-12
    )
    with pytest.raises(ValueError, match="`samples` must have dimension 64"):
        mp.metrics.memorisation(held_out[:, :10], train)


def test_image_grid_shows_the_images():
    import matplotlib

    matplotlib.use("Agg")
    fig = mp.plots.image_grid(X[:25], ncols=10)
    axes = fig.axes
    assert len(axes) == 30  # 3 rows of 10, the last 5 empty
    np.testing.assert_array_equal(axes[11].images[0].get_array(), X[11].reshape(8, 8))
    assert axes[11].images[0].get_clim() == (-1.0, 1.0)
    rows = mp.plots.image_grid({"exact flow": X[:4], "K = 1": X[4:7]}, limits=(-1, 1))
    assert len(rows.axes) == 8 and rows.axes[0].get_ylabel() == "exact flow"
    np.testing.assert_array_equal(rows.axes[5].images[0].get_array(), X[5].reshape(8, 8))
    with pytest.raises(ValueError, match="`samples` must have shape \\(n, 64\\)"):
        mp.plots.image_grid(X[:3, :10])
    with pytest.raises(ValueError, match="`limits`"):
        mp.plots.image_grid(X[:3], limits=(1, 1))
    matplotlib.pyplot.close("all")


DIGITS_STUDIES = """
[sampling]
max_steps = 2
h = 1.5
taus = [0.0]
baselines = []
sample_size = 40
{entries_sampling}
[estimation]
methods = ["cd-euler", "meanflow"]
steps = [0.1, 0.2, 0.4]
seeds = [0, 1]
budgets = [20]
sampler_ks = [1, 2]
eval_samples = 32
sample_size = 40
n_boot = 100
error_models = ["power_law"]
chains = 2
warmup = 50
draws = 100
refits = 0
[estimation.train]
width = 16
batch_size = 32
{entries_estimation}
"""
ENTRIES = """
[{study}.data.digits]
dataset = "digits"
kind = "empirical"
train = 300
delta = 0.01
[{study}.data.digits_gauss]
dataset = "digits"
kind = "gaussian"
"""


@pytest.mark.heavy(80)
def test_studies_on_both_digits_entries_from_toml(tmp_path, capsys, undescribed):
    """`mcm-prob run sampling|estimation --config digits.toml` with both entries, then
    `report`: exact KLs of the fitted Gaussian at d = 64, draws of the empirical measure's
    exact-flow sampler, memorisation and the image grids; the files rebuild the data."""
    from mcm_prob import cli
    from mcm_prob.results import load_tree

    toml = tmp_path / "digits.toml"
    toml.write_text(
        DIGITS_STUDIES.format(
            entries_sampling=ENTRIES.format(study="sampling"),
            entries_estimation=ENTRIES.format(study="estimation"),
        )
    )
    gauss = mp.datasets.digits("gaussian")
    for study in ("sampling", "estimation"):
        out = tmp_path / f"{study}.nc"
        argv = ["run", study, "--config", str(toml), "--out", str(out), "--no-progress"]
        assert cli.main(argv) == 0
        capsys.readouterr()
        assert cli.main(["report", str(out)]) == 0
        text = capsys.readouterr().out
        for entry in ("digits", "digits_gauss"):
            assert (tmp_path / f"{study}_{study}_images_{entry}.png").exists(), (study, entry)
        tree = load_tree(out)
        assert undescribed(tree) == []
        res = tree["results"].to_dataset()
        spec = json.loads(res.attrs["spec:digits"])
        assert spec["dataset"] == "digits" and spec["train"] == 300
        rebuilt = mp.data.from_spec({k: v for k, v in spec.items() if k != "delta"})
        np.testing.assert_array_equal(np.asarray(rebuilt.atoms), X[:300])
        if study == "sampling":
            assert "entries without exact laws" in text
            for k in (1, 2):  # the stored KL is the exact law's at d = 64
                law = mp.sampler_law(gauss, delta=0.01, h=1.5, steps=k)
                want = mp.metrics.kl_gaussian(law, gauss.marginal(0.01))
                got = float(res["kl"].sel(entry="digits_gauss", tau=0.0, steps=k))
                assert got == pytest.approx(want, rel=1e-10)
            emp = res.sel(entry="digits", tau=0.0)
            assert np.all(np.isfinite(emp["energy_distance"])) and np.all(np.isnan(emp["kl"]))
            # draws at delta = 0.01 are training images plus p_delta's noise (0.14 per pixel)
            assert np.all((emp["memorisation"] > 0.1) & (emp["memorisation"] < 0.8))
            assert np.all(np.isnan(res["energy_distance"].sel(entry="digits_gauss")))
            # the plot: KL of the entry with exact laws, energy +- se of the one without
            fig = mp.studies.get("sampling").plot(tree)
            kl_ax, energy_ax = fig.axes
            (kl_line,) = kl_ax.lines
            np.testing.assert_array_equal(
                kl_line.get_ydata(), res["kl"].sel(entry="digits_gauss", tau=0.0)
            )
            (bars,) = energy_ax.containers
            np.testing.assert_array_equal(bars.lines[0].get_ydata(), emp["energy_distance"])
            assert "tau=0" in energy_ax.get_legend().get_texts()[0].get_text()
            images = res["images"].values
        else:
            assert (
                "quality against memorisation at budget 20" in text and "digits (empirical)" in text
            )
            flow = res["memorisation_k_exact_flow"]
            assert np.all((flow.sel(entry="digits") > 0.1) & (flow.sel(entry="digits") < 0.8))
            assert np.all(np.isnan(flow.sel(entry="digits_gauss")))
            learned = res["memorisation_k"].sel(entry="digits")
            # (three CD steps + MeanFlow at step 0) x 2 seeds x 2 K
            assert np.isfinite(learned).sum() == (3 + 1) * 2 * 2
            images = np.concatenate(
                [res["images"].values.ravel(), res["images_exact_flow"].values.ravel()]
            )
        assert np.all(np.isfinite(images)) and np.abs(images).max() < 10
