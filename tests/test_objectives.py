"""Objectives on exact ground truth: the closed-form flow map (or the teacher's composed map) is
a fixed point of every objective; both network forms have the right derivatives on the
diagonal; every objective learns in a small fit on OU, VP and the linear interpolant; a
user-written objective trains through the same interface."""

import math
import re
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mcm_prob as mp
from mcm_prob import paths, training
from mcm_prob.flow import AbstractFlowMap, safe_quotient, velocity
from mcm_prob.training.objective import Context

DATA = mp.data.Gaussian([0.5, -0.3], [[1.0, 0.3], [0.3, 0.5]])
PATHS = {"ou": (mp.OU, 2.0), "vp": (paths.VP(), 1.0), "linear": (paths.LinearInterpolant(), 0.95)}
EXACT = ["cd-exact", "scd", "meanflow-distill", "fmm-lagrangian", "fmm-eulerian", "fmm-progressive"]
TEACHER = ["cd-euler", "cd-heun", "shortcut-distill"]
PAIR = ["sct", "meanflow", "shortcut", "lsd", "esd", "psd"]


class TeacherMap(AbstractFlowMap):
    """The composed map of n = (t - s)/h one-step teachers (Euler or Heun) of the exact PF-ODE:
    CD's fixed point (h = Delta) and the shortcut's (Euler, h = Delta/2)."""

    data: mp.data.DataDistribution
    path: paths.AbstractPath
    teacher: str = eqx.field(static=True)
    h: float = eqx.field(static=True)

    @property
    def dim(self):
        return self.data.dim

    def single(self, x, t, s):
        n = jnp.round((t - s) / self.h).astype(int)

        def body(k, y):
            tk = t - k * self.h
            return mp.pf_ode_step(self.data, y[None], tk, tk - self.h, self.teacher, self.path)[0]

        return jax.lax.fori_loop(0, n, body, x)

    def average_velocity(self, x, t, s):
        exact = velocity(self.data, x[None], t, self.path)[0]
        return safe_quotient(x - self.single(x, t, s), t - s, exact)

    def __call__(self, x, t, s):
        return jax.vmap(self.single, (0, None, None))(x, t, s)


class Perturbed(AbstractFlowMap):
    """f + eps (t - s) tanh(x): a one-parameter family through the model `base` at eps = 0
    that keeps f(x, t, t) = x (u shifts by -eps tanh(x))."""

    base: AbstractFlowMap
    eps: jax.Array

    @property
    def path(self):
        return self.base.path

    @property
    def dim(self):
        return self.base.dim

    def single(self, x, t, s):
        return self.base.single(x, t, s) + self.eps * (t - s) * jnp.tanh(x)

    def average_velocity(self, x, t, s):
        return self.base.average_velocity(x, t, s) - self.eps * jnp.tanh(x)

    def __call__(self, x, t, s):
        return jax.vmap(self.single, (0, None, None))(x, t, s)


def _context(path, T, step, batch=256, iteration=10**6):
    return Context(DATA, path, T, 0.01, jnp.asarray(step), jnp.asarray(iteration), batch)


def _model(label, path, step):
    fp = training.objective_from_spec(label)[1].fixed_point(step)
    if fp is None or fp[0] == "exact":  # the exact teacher's composed map is the exact flow
        return mp.ExactFlow(DATA, path=path)
    return TeacherMap(DATA, path, *fp)


@pytest.mark.parametrize("path_name", list(PATHS))
@pytest.mark.parametrize("label", EXACT + TEACHER)
def test_the_declared_fixed_point_has_zero_loss(label, path_name):
    """With the exact velocity, the declared fixed point (the exact flow, or the composed
    teacher map) makes every example's loss zero to round-off (float64; measured <= 1e-25);
    sCM's adaptive weighting starts at w = 0, so its loss is e^0 |0|^2 - 0."""
    path, T = PATHS[path_name]
    step = T / 8
    _, obj = training.objective_from_spec(label)
    model = _model(label, path, step)
    off = Perturbed(model, jnp.asarray(0.1))  # not a fixed point: the test can fail

    @jax.jit  # one program for both losses (eagerly, every operation compiles on its own)
    def losses(key):
        ctx = _context(path, T, step)
        return obj.loss(model, model, key, ctx), obj.loss(off, model, key, ctx)

    loss, loss_off = (np.asarray(a) for a in losses(jax.random.key(3)))
    assert loss.shape == (256,)
    assert np.max(np.abs(loss)) < 1e-18
    assert np.mean(loss_off) > 1e-6


@pytest.mark.parametrize("label", PAIR)
def test_pair_objectives_are_stationary_at_their_fixed_point_in_expectation(label):
    """With the pair velocity a'x0 + b'z the loss is noisy at the fixed point, but its
    derivative along a perturbation of the model has mean zero (Gaussian data: the noise of
    the velocity given x_t is symmetric): |mean| < 4 standard errors over 8192 examples,
    while the same derivative at a perturbed model (eps = 0.3) is > 8 standard errors away."""
    path, T = mp.OU, 2.0
    step = T / 8
    _, obj = training.objective_from_spec(label)
    base = _model(label, path, step)
    ctx = _context(path, T, step, batch=8192)

    @jax.jit  # one program for both points
    @jax.jacfwd
    def per_example(eps, at):
        return obj.loss(Perturbed(base, eps), Perturbed(base, at), jax.random.key(5), ctx)

    for at, lo, hi in ((0.0, 0.0, 4.0), (0.3, 8.0, math.inf)):
        at = jnp.asarray(at)
        g = np.asarray(per_example(at, at))
        z = abs(g.mean()) / (g.std() / math.sqrt(g.size))
        assert lo <= z < hi, (at, z)


@pytest.mark.parametrize("path_name", list(PATHS))
@pytest.mark.parametrize("form", ["boundary", "displacement"])
def test_network_derivatives_and_average_velocity(form, path_name):
    """float64 net, t = 0.6 T: d f/dt and d f/ds at s = t (forward mode) equal central
    differences (h = 1e-5, agreement 1e-7); the average velocity equals (x - f)/(t - s) off the
    diagonal (s = t - 1e-3 and s = t/3, to 1e-8 relative) and d f/ds on it."""
    path, T = PATHS[path_name]
    net = mp.training.NetworkConfig(form=form, width=16, depth=2, dtype="float64").build(
        2, path, jax.random.key(0)
    )
    x, t, h = jnp.array([0.3, -0.7]), 0.6 * T, 1e-5

    @jax.jit  # one program (eagerly, every operation compiles on its own)
    def derivatives(x, t):
        f = net.single
        return {
            "df_dt": jax.jacfwd(f, 1)(x, t, t),
            "df_ds": jax.jacfwd(f, 2)(x, t, t),
            "fd_t": (f(x, t + h, t) - f(x, t - h, t)) / (2 * h),
            "fd_s": (f(x, t, t + h) - f(x, t, t - h)) / (2 * h),
            "u_diag": net.average_velocity(x, t, t),
            "off": [
                (net.average_velocity(x, t, s), (x - f(x, t, s)) / (t - s))
                for s in (t - 1e-3, t / 3)
            ],
        }

    d = derivatives(x, jnp.asarray(t))
    np.testing.assert_allclose(d["df_dt"], d["fd_t"], atol=1e-7)
    np.testing.assert_allclose(d["df_ds"], d["fd_s"], atol=1e-7)
    np.testing.assert_allclose(d["u_diag"], d["df_ds"], atol=1e-12)
    assert np.max(np.abs(d["df_dt"])) > 1e-3  # the derivative on the diagonal is not frozen at 0
    for u, direct in d["off"]:
        np.testing.assert_allclose(u, direct, rtol=1e-8, atol=1e-10)


SMALL = ["cd-euler", "cd-heun", "cd-exact", "ct", "sct", "meanflow", "shortcut"]
SMALL += ["fmm-lagrangian", "fmm-eulerian", "psd"]


@pytest.mark.heavy(50)
@pytest.mark.parametrize("path_name", list(PATHS))
def test_every_objective_learns_on_every_path(path_name):
    """fit_grid of each objective (displacement net 32 x 2, batch 64, 1000 iterations in
    chunks of 50: one compilation each): the mean consistency error against the exact flow at
    iteration 1000 is below 0.65 x the one at iteration 50 (measured ratios 0.01-0.52; the
    largest, sCT's, from its pair-velocity noise)."""
    path, T = PATHS[path_name]
    pairs = [(0.5 * T, 0.01), (T, 0.4 * T)]
    ref = mp.metrics.reference_flows(DATA, pairs, key=jax.random.key(1), n=512, path=path)
    settings = mp.FitConfig(
        path=path,
        T=T,
        iterations=1000,
        batch_size=64,
        chunk_size=50,
        progress=False,
        network=mp.NetworkConfig(form="displacement", width=32, depth=2),
    )
    ratios = {}
    for label in SMALL:
        _, obj = training.objective_from_spec(label)
        steps = [T / 8] if obj.has_step else None
        _, hist = mp.fit_grid(
            DATA, obj, steps=steps, seeds=[0], checkpoints=[50, 1000], settings=settings
        )
        err = [
            float(
                mp.consistency_error(
                    hist["checkpoints"][k], DATA, pairs, key=jax.random.key(1), reference=ref
                ).mean.mean()
            )
            for k in (50, 1000)
        ]
        ratios[label] = err[1] / err[0]
    assert all(r < 0.65 for r in ratios.values()), sorted(ratios.items(), key=lambda kv: -kv[1])


def test_fit_equals_fit_grid_and_returns_the_trained_weighting():
    """fit of a continuous objective is the fit_grid model of the same seed (Delta = 0 row)
    and returns sCM's weighting trained away from its zero start."""
    settings = mp.FitConfig(
        T=2.0,
        iterations=40,
        batch_size=32,
        progress=False,
        network=mp.NetworkConfig(width=16, depth=1),
    )
    obj = mp.ContinuousConsistency("pair")
    model, hist = mp.fit(DATA, obj, jax.random.key(4), settings=settings)
    grid, ghist = mp.fit_grid(DATA, obj, seeds=[4], settings=settings)
    assert grid.steps == (0.0,)
    x = jnp.array([[0.2, 0.1], [-1.0, 0.4]])
    np.testing.assert_allclose(model(x, 1.5, 0.2), grid[0, 0](x, 1.5, 0.2), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(hist["loss"], ghist["loss"][0, 0], rtol=1e-5)
    assert np.max(np.abs(np.asarray(hist["objective"].weight.weights))) > 1e-4
    with pytest.raises(ValueError, match="continuous-time objective"):
        mp.fit_grid(DATA, obj, steps=[0.1], seeds=[0], settings=settings)
    with pytest.raises(ValueError, match="has a discretization step"):
        mp.fit(DATA, mp.CD("euler"), jax.random.key(0), settings=settings)
    with pytest.raises(ValueError, match="`velocity` must be one of"):
        mp.MeanFlow(velocity="score")


class L1Distillation(training.AbstractObjective):
    """A user's objective: CD with the Euler teacher and the L1 distance, built from the public
    grid batch, defined outside the package."""

    has_step: ClassVar[bool] = True

    def loss(self, model, target, key, ctx):
        x_t, t, x_prev, t_prev, s = training.grid_batch(key, ctx, teacher="euler")
        pred = jax.vmap(model.single)(x_t, t, s)
        goal = jax.vmap(target.single)(x_prev, t_prev, s)
        return jnp.sum(jnp.abs(pred - goal), -1)

    def fixed_point(self, step):
        return ("euler", step)


def test_a_user_objective_trains_through_the_interface():
    """The user's L1 CD: zero loss at the Euler teacher's composed map (to 1e-12), and
    fit_grid over two steps lowers the consistency error against the exact flow by > 2x."""
    model = TeacherMap(DATA, mp.OU, "euler", 0.25)
    loss = L1Distillation().loss(model, model, jax.random.key(0), _context(mp.OU, 2.0, 0.25))
    assert np.max(np.asarray(loss)) < 1e-12
    settings = mp.FitConfig(
        T=2.01,
        iterations=1000,
        batch_size=64,
        chunk_size=50,
        progress=False,
        network=mp.NetworkConfig(width=32, depth=2),
    )
    _, hist = mp.fit_grid(
        DATA,
        L1Distillation(),
        steps=[0.25, 0.5],
        seeds=[0],
        checkpoints=[20, 300],
        settings=settings,
    )
    pairs = [(1.01, 0.01), (2.01, 1.01)]
    err = [
        mp.consistency_error(hist["checkpoints"][k], DATA, pairs, key=jax.random.key(1), n=512).mean
        for k in (20, 300)
    ]
    assert np.all(err[1] < 0.5 * err[0]), err


@pytest.mark.heavy(100)
def test_estimation_study_over_objectives(tmp_path, undescribed):
    """The estimation study with a discrete CD, a continuous sCT and a shortcut (a table with
    its own label): the step axis starts at 0, where only the continuous method has values;
    the shortcut's teacher error is that of Euler steps of Delta/2 (order about 2 in squared
    distance, theory 2); the error models cover the discrete methods; /objectives compares all
    three, with the exact grid-law KL of the K-step samplers (1-d entry) and the exact flow's
    K-step sampler exact to 1e-3 nats; the report shows the comparison."""
    from mcm_prob import studies
    from mcm_prob.results import load_tree
    from tests.test_studies import TINY_ESTIMATION

    cfg = studies.EstimationConfig(
        **TINY_ESTIMATION
        | {
            "data": {"g1": {"family": "gaussian", "mean": [0.5], "cov": [[0.6]]}},
            "methods": ("cd-euler", "sct", {"objective": "shortcut", "label": "sc"}),
            "sampler_ks": (1, 2),
        }
    )
    tree = studies.run_estimation(cfg, tmp_path / "obj.nc", progress=False)
    assert undescribed(load_tree(tmp_path / "obj.nc")) == []
    res = tree["results"].to_dataset()
    np.testing.assert_array_equal(res["step"].values, [0.0, 0.1, 0.2, 0.4])
    err = res["consistency_error_mean"].isel(entry=0, train_size=0)
    assert np.all(np.isfinite(err.sel(fit_method="sct", step=0.0)))
    assert np.all(np.isnan(err.sel(fit_method="sct").isel(step=slice(1, None))))
    assert np.all(np.isnan(err.sel(fit_method="cd-euler", step=0.0)))
    assert np.all(np.isfinite(err.sel(fit_method=["cd-euler", "sc"]).isel(step=slice(1, None))))
    summary = tree["summary"].to_dataset()
    assert list(summary["fit_method"].values) == ["cd-euler", "sc"]
    order = float(summary["teacher_order"].sel(fit_method="sc").isel(entry=0))
    assert 1.6 < order < 2.4
    assert float(summary["teacher_order_theory"].sel(fit_method="sc")) == 2.0
    obj = tree["objectives"].to_dataset()
    assert set(obj["lowest_error"].values.ravel()) <= {"cd-euler", "sct", "sc"}
    assert np.all(np.isfinite(obj["kl_grid"])) and np.all(np.isfinite(obj["seconds_per_iteration"]))
    assert np.all(np.abs(obj["kl_grid_exact_flow"]) < 1e-3)
    assert set(obj["more_steps"].values.ravel()) <= {"help", "hurt", "unclear"}
    text = studies.STUDIES["estimation"].report(tree)
    assert "objectives compared" in text and "sc " in text
    # the K-step tables print no negative k-NN estimate as a KL: '<0 (bias)' stands for it
    tables = text[text.index("sampler with K steps") : text.index("per step at budget")]
    assert not re.search(r"(?<![\w.])-\d", tables), tables
    negative = (obj["kl_estimate"] < 0).sum() + (
        obj["kl_estimate_exact_flow"] < 0
    ).sum() * obj.sizes["train_size"]
    assert tables.count("<0 (bias)") == int(negative)
    # estimates below the exact-flow sampler's (the estimator's floor) are marked '*'
    knn = obj["kl_estimate"]
    below = ((knn >= 0) & (knn < obj["kl_estimate_exact_flow"])).sum()
    assert len(re.findall(r"\d\*", tables)) == int(below)
    fig = studies.STUDIES["estimation"].plot(tree)
    labels = fig.axes[4].get_legend_handles_labels()[1]
    assert labels == ["cd-euler", "sct", "sc"]  # the objectives row: one curve per method


def test_a_displacement_net_saves_and_loads(tmp_path):
    """TrainConfig(network="displacement") fits a DisplacementNet, which save_model writes and
    load_model rebuilds with identical outputs; a net that disagrees with its config is refused."""
    cfg = mp.TrainConfig(network="displacement", iterations=5, width=8, depth=1, progress=False)
    model, _ = mp.fit(DATA, cfg, jax.random.key(0))
    assert isinstance(model, mp.DisplacementNet)
    mp.save_model(tmp_path / "d.eqx", model, cfg)
    loaded = mp.load_model(tmp_path / "d.eqx")
    x = jnp.array([[0.1, 0.2], [-0.5, 1.0]])
    np.testing.assert_array_equal(loaded(x, 2.0, 0.5), model(x, 2.0, 0.5))
    with pytest.raises(ValueError, match="says ConsistencyNet"):
        mp.save_model(tmp_path / "e.eqx", model, mp.TrainConfig())
