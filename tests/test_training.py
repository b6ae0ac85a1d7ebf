"""Consistency networks and their fitting with an explicit discretization step."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mcm_prob as mp
from mcm_prob.networks import boundary_coefficients

GAUSS = mp.data.Gaussian([1.0, -0.5], [[1.0, 0.3], [0.3, 0.5]])
MIX = mp.data.GaussianMixture(
    [0.4, 0.6], [[-1.5, 0.0], [1.5, 0.5]], [np.diag([0.3, 0.3]), np.diag([0.3, 0.5])]
)
SMALL = dict(width=64, depth=2, T=3.0, progress=False)
PAIRS = mp.metrics.default_time_pairs(0.01, 3.0)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**31 - 1),
    t=st.floats(0.0, 20.0, allow_subnormal=False),  # (0, tiny) is refused by name
    scale=st.floats(1e-3, 1e3),
    dtype=st.sampled_from([jnp.float32, jnp.float64]),
)
def test_boundary_condition_exact_for_random_weights(seed, t, scale, dtype):
    k1, k2 = jax.random.split(jax.random.key(seed))
    net = mp.ConsistencyNet(3, width=16, depth=2, key=k1, dtype=dtype)
    x = (scale * jax.random.normal(k2, (5, 3))).astype(dtype)
    out = net(x, t, t)
    np.testing.assert_array_equal(out, x)


def test_boundary_coefficients_and_small_t():
    skip, out = boundary_coefficients(1e-6, 1e-6)
    assert float(skip) == 1.0 and float(out) == 0.0
    skip, out = boundary_coefficients(0.0, 0.0)
    assert float(skip) == 1.0 and float(out) == 0.0
    # DDIM coefficients: f = (sigma_s / sigma_t) x + (alpha_s - alpha_t sigma_s / sigma_t) g
    t, s = 0.7, 0.2
    skip, out = boundary_coefficients(t, s)
    r = np.sqrt(-np.expm1(-2 * s) / -np.expm1(-2 * t))
    np.testing.assert_allclose([skip, out], [r, np.exp(-s) - np.exp(-t) * r], rtol=1e-14)
    net = mp.ConsistencyNet(2, key=jax.random.key(0))
    assert np.all(np.isfinite(net(jnp.ones((3, 2)), 1e-5, 0.0)))
    assert net(jnp.ones((4, 5, 2)), 1.0, 0.5).shape == (4, 5, 2)


def test_cd_exact_teacher_learns_flow_map():
    """CD with the exact-flow teacher on 2-d Gaussian data (Delta = 0.1, 1500 iterations):
    mean consistency error < 5e-3 over the default (t, s) pairs, against 0.28 for the identity
    map (measured: 4.6e-4)."""
    cfg = mp.TrainConfig(method="cd", teacher="exact", step=0.1, iterations=1500, **SMALL)
    model, history = mp.fit(GAUSS, cfg, jax.random.key(0))
    assert history["loss"].shape == (1500,)
    err = mp.consistency_error(model, GAUSS, PAIRS, key=jax.random.key(1), n=2048)
    ident = mp.consistency_error(lambda x, t, s: x, GAUSS, PAIRS, key=jax.random.key(1), n=2048)
    assert err.mean < 5e-3
    assert ident.mean > 0.25


def test_euler_teacher_error_grows_with_step():
    """Euler-teacher CD inherits the teacher's O(Delta) global error: at Delta = 0.4 the
    consistency error exceeds that at Delta = 0.05 by more than 10 seed-to-seed standard
    deviations (3 seeds, common random numbers; measured: 1.1e-3 against 1.57e-2)."""
    cfg = mp.TrainConfig(method="cd", teacher="euler", iterations=1500, **SMALL)
    grid, history = mp.fit_grid(GAUSS, cfg, steps=[0.05, 0.4], seeds=[0, 1, 2])
    assert history["loss"].shape == (2, 3, 1500)
    assert np.all(history["failed_at"] == -1)
    err = mp.consistency_error(grid, GAUSS, PAIRS, key=jax.random.key(1), n=2048).mean
    assert err.shape == (2, 3)
    small, large = err[0], err[1]
    spread = max(small.std(ddof=1), large.std(ddof=1))
    assert large.mean() - small.mean() > 10 * spread
    assert large.min() > small.max()


def test_ct_on_mixture_beats_untrained_net():
    """CT on a 2-component Gaussian mixture: consistency error below 10% of the untrained net's
    (measured: 0.039 against 1.2)."""
    cfg = mp.TrainConfig(method="ct", step=0.05, iterations=1500, **SMALL)
    model, _ = mp.fit(MIX, cfg, jax.random.key(0))
    untrained = mp.ConsistencyNet(2, width=64, depth=2, key=jax.random.key(0))
    err = mp.consistency_error(model, MIX, PAIRS, key=jax.random.key(1), n=1024)
    err0 = mp.consistency_error(untrained, MIX, PAIRS, key=jax.random.key(1), n=1024)
    assert err.mean < 0.1 * err0.mean


@pytest.mark.parametrize(
    "method,teacher,sampling", [("cd", "heun", "uniform"), ("ct", "euler", "lognormal")]
)
def test_grid_equals_individual_fits(method, teacher, sampling):
    cfg = mp.TrainConfig(
        method=method,
        teacher=teacher,
        time_sampling=sampling,
        iterations=60,
        chunk_size=25,
        width=32,
        depth=2,
        batch_size=64,
        loss="pseudo_huber",
        progress=False,
    )
    steps, seeds = [0.05, 0.3], [3, 7]
    grid, history = mp.fit_grid(MIX, cfg, steps=steps, seeds=seeds)
    x = MIX.marginal(1.0).sample(jax.random.key(2), (64,))
    stacked = grid(x, 1.0, 0.2)
    assert stacked.shape == (2, 2, 64, 2)
    for i, step in enumerate(steps):
        for j, seed in enumerate(seeds):
            model, hist = mp.fit(MIX, dataclasses.replace(cfg, step=step), jax.random.key(seed))
            np.testing.assert_allclose(hist["loss"], history["loss"][i, j], rtol=2e-4, atol=1e-7)
            np.testing.assert_allclose(model(x, 1.0, 0.2), stacked[i, j], rtol=1e-4, atol=1e-6)
            # indexing picks the stacked weights exactly; the stack is evaluated by one compiled
            # program, the single model op by op: float32 round-off apart (eps = 1.2e-7)
            picked = jax.tree_util.tree_leaves(eqx.filter(grid[i, j], eqx.is_array))
            stack = jax.tree_util.tree_leaves(eqx.filter(grid.models, eqx.is_array))
            for a, b in zip(picked, stack, strict=True):
                np.testing.assert_array_equal(a, b[i, j])
            np.testing.assert_allclose(grid[i, j](x, 1.0, 0.2), stacked[i, j], rtol=1e-6, atol=1e-7)


def test_divergence_is_reported():
    cfg = mp.TrainConfig(learning_rate=1e30, iterations=30, width=16, depth=1, progress=False)
    with pytest.raises(
        mp.TrainingDiverged, match=r"iteration \d+ with config .*learning_rate"
    ) as info:
        mp.fit(GAUSS, cfg, jax.random.key(0))
    assert info.value.history["loss"].shape == (30,)
    assert np.all(np.isfinite(info.value.history["loss"][: info.value.iteration]))
    grid, history = mp.fit_grid(GAUSS, cfg, steps=[0.1], seeds=[0, 1])
    assert np.all(history["failed_at"] >= 0)
    i = int(history["failed_at"][0, 0])
    assert not np.isfinite(history["loss"][0, 0, i])
    assert np.all(np.isnan(history["loss"][0, 0, i + 1 :]))
    assert np.all(np.isfinite(history["loss"][0, 0, :i]))


def test_lognormal_time_sampling_distribution():
    """Lognormal-in-index sampling gives P(n) = Phi(z_n) - Phi(z_{n-1}) renormalised over the grid."""
    from scipy import stats

    from mcm_prob.training import time_indices

    cfg = mp.TrainConfig(time_sampling="lognormal", step=0.25, T=3.0, delta=0.01)
    n_max = cfg.grid_size()
    n = np.asarray(time_indices(jax.random.key(0), cfg, 0.25, n_max, (200_000,)))
    grid = cfg.delta + 0.25 * np.arange(n_max + 1)
    cdf = stats.norm.cdf((np.log(grid) - cfg.lognormal_loc) / cfg.lognormal_scale)
    probs = np.diff(cdf) / (cdf[-1] - cdf[0])
    counts = np.bincount(n.astype(int), minlength=n_max + 1)[1:]
    se = np.sqrt(probs * (1 - probs) / n.size)
    assert np.all(np.abs(counts / n.size - probs) < 5 * se + 1e-12)


def test_consistency_error_closed_form_for_identity():
    """For f = identity on Gaussian data, E||x - Phi(x)||^2 = tr((I-A) Sigma_t (I-A)^T) + |m_t - m_s|^2."""
    t, s = 1.0, 0.2
    a_t, a_s = np.exp(-t), np.exp(-s)
    lam, u = np.linalg.eigh(np.asarray(GAUSS.cov))
    nu = lambda tau: np.exp(-2 * tau) * lam + 1 - np.exp(-2 * tau)  # noqa: E731
    amat = u @ np.diag(np.sqrt(nu(s) / nu(t))) @ u.T
    cov_t = np.asarray(GAUSS.cov_t(t))
    m = np.asarray(GAUSS.mean)
    exact = np.trace((np.eye(2) - amat) @ cov_t @ (np.eye(2) - amat).T) + np.sum(
        (a_t - a_s) ** 2 * m**2
    )
    res = mp.consistency_error(lambda x, t, s: x, GAUSS, [(t, s)], key=jax.random.key(0), n=20_000)
    assert abs(res.per_pair[0] - exact) < 5 * res.stderr[0]
    flow = mp.consistency_error(mp.ExactFlow(GAUSS), GAUSS, [(t, s)], key=jax.random.key(0), n=100)
    assert flow.mean < 1e-28


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(method="dsm"), "`method` must be one of"),
        (dict(step=0.0), "`step` must be a finite number > 0"),
        (dict(step=10.0), "larger than T - delta"),
        (dict(teacher="rk4"), "`teacher` must be one of"),
        (dict(delta=-0.1), "`delta` must be a finite number >= 0 and < 4.0"),
        (dict(iterations=0), "`iterations` must be an integer >= 1"),
        (dict(batch_size=2.5), "`batch_size` must be an integer"),
        (dict(ema_decay=1.0), "`ema_decay` must be a finite number >= 0 and < 1"),
        (dict(loss="l1"), "`loss` must be one of"),
        (dict(learning_rate=float("nan")), "`learning_rate` must be a finite number"),
        (dict(dtype="float16"), "`dtype` must be one of"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mp.TrainConfig(**kwargs)


def test_bad_fit_arguments():
    dirac = mp.data.DiracMixture([[0.0, 0.0], [1.0, 1.0]])
    with pytest.raises(ValueError, match="non-smooth: `delta` must be > 0"):
        mp.fit(dirac, mp.TrainConfig(delta=0.0, progress=False), jax.random.key(0))
    with pytest.raises(TypeError, match="`data` must be a mcm_prob.data.DataDistribution"):
        mp.fit("gaussian", mp.TrainConfig(progress=False), jax.random.key(0))
    with pytest.raises(ValueError, match="larger than T - delta"):
        mp.fit_grid(GAUSS, mp.TrainConfig(progress=False), steps=[0.1, 50.0], seeds=[0])
    for bad in ([0.5], [-1]):
        with pytest.raises(ValueError, match=r"`seeds\[0\]` must be an integer"):
            mp.fit_grid(GAUSS, mp.TrainConfig(progress=False), steps=[0.1], seeds=bad)
    with pytest.raises(ValueError, match="s <= t"):
        mp.consistency_error(lambda x, t, s: x, GAUSS, [(0.1, 0.5)], key=jax.random.key(0))


def test_train_size_draws_from_one_fixed_sample():
    """With train_size = n every training x_0 is a row of the model's fixed training set
    (recovered exactly from a CT batch: x_t and x_{t-Delta} share x_0 and z), the batches
    reuse it (fewer distinct rows than draws), and a fit on n = 2 points learns to map noise
    onto those two points, not onto the data law."""
    data = mp.data.Gaussian([0.0], [[1.0]])
    cfg = mp.TrainConfig(method="ct", step=0.1, T=2.0, batch_size=64, train_size=5)
    key = jax.random.key(3)
    pool = mp.training_set(data, cfg, key)
    assert pool.shape == (5, 1)
    from mcm_prob.training import training_batch

    seen = []
    for it in range(10):
        x_t, t, x_prev, t_prev, _ = training_batch(
            data, cfg, 0.1, jax.random.fold_in(key, it), pool
        )
        a, s = mp.alpha(t)[:, None], mp.sigma(t)[:, None]
        a1, s1 = mp.alpha(t_prev)[:, None], mp.sigma(t_prev)[:, None]
        x0 = (s1 * x_t - s * x_prev) / (s1 * a - s * a1)
        dist_to_pool = np.min(np.abs(np.asarray(x0)[:, None, 0] - np.asarray(pool)[None, :, 0]), 1)
        assert np.max(dist_to_pool) < 1e-9
        seen.append(np.asarray(x0)[:, 0])
    assert len(np.unique(np.round(np.concatenate(seen), 9))) <= 5

    # CT on n = 2 points learns their empirical law: noise is sent close to the two points
    # (output sd about 0.2), while the same fit on fresh draws reproduces N(0, 1) (sd near 1)
    fit_cfg = mp.TrainConfig(
        method="ct",
        step=0.1,
        T=2.0,
        delta=0.01,
        iterations=1500,
        batch_size=128,
        width=32,
        depth=2,
        train_size=2,
        progress=False,
    )
    x = jax.random.normal(jax.random.key(9), (400, 1))
    points = np.asarray(mp.training_set(data, fit_cfg, jax.random.key(0)))[:, 0]
    spread = {}
    for n in (2, None):
        grid, _ = mp.fit_grid(
            data, dataclasses.replace(fit_cfg, train_size=n), steps=[0.1], seeds=[0]
        )
        y = np.asarray(grid[0, 0](x, 1.91, 0.01))[:, 0]
        spread[n] = np.std(y)
        if n == 2:
            assert np.median(np.min(np.abs(y[:, None] - points[None, :]), 1)) < 0.2
    assert spread[2] < 0.35 and spread[None] > 0.7
    with pytest.raises(ValueError, match="`train_size` must be an integer >= 1"):
        mp.TrainConfig(train_size=0)


def test_checkpoints_equal_shorter_fits():
    """A checkpoint at k iterations is the k-iteration fit (constant learning rate, EMA)."""
    data = mp.data.Gaussian([0.0, 1.0], [[1.0, 0.2], [0.2, 0.5]])
    cfg = mp.TrainConfig(
        iterations=60, batch_size=32, width=8, depth=1, chunk_size=20, progress=False
    )
    _, hist = mp.fit_grid(data, cfg, steps=[0.2, 0.4], seeds=[0, 1], checkpoints=[30, 60])
    short, _ = mp.fit_grid(
        data, dataclasses.replace(cfg, iterations=30), steps=[0.2, 0.4], seeds=[0, 1]
    )
    x = jax.random.normal(jax.random.key(1), (16, 2))
    np.testing.assert_allclose(
        hist["checkpoints"][30](x, 1.0, 0.3), short(x, 1.0, 0.3), rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ValueError, match="`checkpoints` must lie in 1..iterations"):
        mp.fit_grid(data, cfg, steps=[0.2], seeds=[0], checkpoints=[61])


_SHARDED = """
import sys, equinox as eqx, jax, numpy as np
jax.config.update("jax_enable_x64", True)
import mcm_prob as mp
from tests.test_training import sharding_case
assert jax.local_device_count() == 4, jax.local_devices()
grid, history = sharding_case()
leaves = jax.tree_util.tree_leaves(eqx.filter(grid.models, eqx.is_array))
assert all(len(a.sharding.device_set) == 4 for a in leaves), [a.sharding for a in leaves]
np.savez(sys.argv[1], loss=history["loss"], failed_at=history["failed_at"],
         **{f"w{i}": np.asarray(a) for i, a in enumerate(leaves)})
"""


def sharding_case():
    """A 3 x 2 grid (6 models: padded to 8 on 4 devices) with a training-set pool and
    checkpoints, the parts that carry the model axis."""
    changes = dict(width=16, depth=1, iterations=40, chunk_size=15, batch_size=32)
    cfg = mp.TrainConfig(**(SMALL | changes), train_size=50, dtype="float64")
    return mp.fit_grid(MIX, cfg, steps=[0.05, 0.1, 0.3], seeds=[1, 2], checkpoints=[20])


def test_initial_weights_are_one_program_for_every_objective_and_setting():
    """A fit's initial weights are one compiled program per network, path and model count
    (`training.loop._init_networks`): a second objective (with parameters of its own) and
    other loop settings (T, delta, iterations, optimiser) compile no new weights program. The
    weights equal an eager build of each model from its key, bit for bit, and the objective's
    parameters are copied to every model."""
    from mcm_prob.training import loop

    compiled = []

    def listener(event, seconds, *, fun_name="", **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(fun_name)

    net = mp.NetworkConfig(width=8, depth=1)
    first = mp.FitConfig(T=2.0, iterations=10, network=net, progress=False)
    second = dataclasses.replace(
        first, T=1.5, delta=0.02, iterations=20, optimizer=mp.OptimizerConfig(grad_clip=1.0)
    )
    keys = jax.random.split(jax.random.key(3), 3)
    objective = mp.ContinuousConsistency("pair")
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        state = loop._init(2, first, mp.training.objective_from_spec("ct")[1], keys)[0]
        compiled.clear()
        again = loop._init(2, second, objective, keys)[0]
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert not [name for name in compiled if "init_networks" in name], compiled
    for i, k in enumerate(keys):
        eager = eqx.filter(net.build(2, first.path, jax.random.split(k)[0]), eqx.is_inexact_array)
        for got in (state.params[0], again.params[0]):
            for a, b in zip(
                jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(eager), strict=True
            ):
                np.testing.assert_array_equal(a[i], b)
    own = eqx.filter(objective, eqx.is_inexact_array)
    for a, b in zip(
        jax.tree_util.tree_leaves(again.params[1]), jax.tree_util.tree_leaves(own), strict=True
    ):
        np.testing.assert_array_equal(a, np.broadcast_to(b, (3, *b.shape)))
    assert jax.tree_util.tree_leaves(own)  # the objective has parameters to copy
    assert not bool(again.failed.any()) and list(again.failed_at) == [-1] * 3


@pytest.mark.heavy(20)
def test_sharded_grid_equals_single_device(tmp_path):
    """`fit_grid` over 4 (forced host) devices gives the single-device models and losses."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "sharded.npz"
    root = Path(__file__).resolve().parents[1]
    env = os.environ | {
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(root),
    }
    subprocess.run(
        [sys.executable, "-c", _SHARDED, str(out)], check=True, env=env, cwd=root, timeout=300
    )
    got = np.load(out)
    grid, history = sharding_case()
    np.testing.assert_array_equal(got["failed_at"], history["failed_at"])
    # float64 training: equal up to round-off (XLA vectorises a batch of 2 models per device
    # differently from one of 6, so the sums are not associated the same way bit for bit)
    np.testing.assert_allclose(got["loss"], history["loss"], rtol=1e-12)
    for k, a in enumerate(jax.tree_util.tree_leaves(eqx.filter(grid.models, eqx.is_array))):
        np.testing.assert_allclose(got[f"w{k}"], np.asarray(a), rtol=1e-11, atol=1e-14)


def test_network_finite_at_large_times_and_refuses_s_above_t():
    """float32 nets stay finite far beyond t = 44 (where e^{2t} - 1 overflows float32); the
    time feature log rho_t matches float64 numpy to float32 round-off; s > t is refused."""
    tau = np.array([1e-4, 0.3, 5.0, 14.9, 15.1, 40.0, 44.5, 100.0, 1e4])
    exact = tau + 0.5 * np.log(-np.expm1(-2 * tau))  # log sqrt(e^{2 tau} - 1), float64
    got = np.asarray(mp.OU.log_rho(jnp.asarray(tau, jnp.float32)), np.float64)
    np.testing.assert_allclose(got, exact, rtol=2e-6, atol=1e-6)
    net = mp.ConsistencyNet(2, width=16, depth=1, key=jax.random.key(0))
    x = jnp.ones((3, 2), jnp.float32)
    for t, s in ((50.0, 0.01), (100.0, 60.0), (300.0, 300.0), (44.0, 0.0)):
        out = np.asarray(net(x, t, s))
        assert np.all(np.isfinite(out)), (t, s)
    np.testing.assert_array_equal(net(x, 300.0, 300.0), x)  # f(x, t, t) = x
    with pytest.raises(ValueError, match=r"`s` must be <= `t` \(0 <= s <= t\), got s=2.0 > t=1.0"):
        net(x, 1.0, 2.0)


def test_saved_model_round_trip_bit_identical_and_trained_range(tmp_path, key):
    """A saved and reloaded net gives bit-identical outputs, keeps its config and data spec,
    and `sample` refuses a schedule outside its trained time range (start 8.05 > T = 2.05)."""
    data = mp.data.GaussianMixture(
        jnp.array([0.5, 0.5]),
        jnp.array([[-1.0, 0.0], [1.0, 0.5]]),
        jnp.stack([0.2 * jnp.eye(2)] * 2),
    )
    cfg = mp.TrainConfig(
        T=2.05,
        delta=0.05,
        step=0.25,
        iterations=30,
        batch_size=32,
        width=16,
        depth=2,
        progress=False,
    )
    net, _ = mp.fit(data, cfg, key)
    path = mp.save_model(tmp_path / "m.eqx", net, cfg, data=data)
    model = mp.load_model(path)
    assert isinstance(model, mp.TrainedModel) and model.config == cfg
    assert model.trained_range == (0.05, 2.05)
    x = jax.random.normal(jax.random.key(3), (64, 2), jnp.float32)
    for t, s in [(2.0, 0.05), (1.0, 0.5), (0.3, 0.3)]:
        np.testing.assert_array_equal(model(x, t, s), net(x, t, s))
    np.testing.assert_array_equal(model.data.score(x, 1.0), data.score(x, 1.0))
    ok = mp.sample(model, jax.random.key(1), 16, dim=2, delta=0.05, h=0.5, steps=4)
    np.testing.assert_array_equal(
        ok.samples, mp.sample(net, jax.random.key(1), 16, dim=2, delta=0.05, h=0.5, steps=4).samples
    )
    with pytest.raises(
        ValueError, match=r"outside the time range it was trained on \[0.05, 2.05\]"
    ):
        mp.sample(model, jax.random.key(1), 16, dim=2, delta=0.05, h=0.5, steps=16)
    with pytest.raises(ValueError, match="trained on"):
        mp.sample(model, jax.random.key(1), 16, dim=2, delta=0.01, h=0.5, steps=2)
    with pytest.warns(UserWarning, match="extrapolations"):
        out = mp.sample(
            model, jax.random.key(1), 16, dim=2, delta=0.05, h=0.5, steps=16, extrapolate=True
        )
    assert np.all(np.isfinite(out.samples))
    # saving the loaded model again gives the same bytes; damaged files are refused by name
    again = mp.save_model(tmp_path / "again.eqx", model)
    assert again.read_bytes() == path.read_bytes()
    (tmp_path / "bad.eqx").write_bytes(b"not a model\n")
    with pytest.raises(ValueError, match="not a mcm_prob saved model"):
        mp.load_model(tmp_path / "bad.eqx")
    (tmp_path / "cut.eqx").write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="damaged saved model"):
        mp.load_model(tmp_path / "cut.eqx")
    with pytest.raises(TypeError, match="`config` must be the model's TrainConfig"):
        mp.save_model(tmp_path / "x.eqx", net)


def test_one_default_teacher():
    """`TrainConfig`, the `CD` objective and the estimation study share the Euler teacher."""
    from mcm_prob.studies import EstimationConfig
    from mcm_prob.training import CD

    assert mp.TrainConfig().teacher == CD().teacher == EstimationConfig().train.teacher == "euler"
