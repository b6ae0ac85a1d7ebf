"""CD and CT on every Gaussian path: the fitted map's consistency error against the path's exact
flow falls with iterations; the network's boundary form and time features follow the path;
saved models keep their path."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mcm_prob as mp
from mcm_prob import paths

DATA = mp.data.Gaussian([0.5], [[0.6]])
CASES = {
    "ou": (mp.OU, 2.0),
    "vp": (paths.VP(), 1.0),
    "ve": (paths.VE(), 5.0),
    "linear": (paths.LinearInterpolant(), 1.0),  # up to the top time, where a = 0
    "trigflow": (paths.TrigFlow(0.8), math.pi / 2),
    "custom": (paths.CustomPath(lambda t: 1.0 / (1.0 + t**2), lambda t: t * 1.0, t_max=2.0), 2.0),
}


@pytest.mark.parametrize("name", list(CASES))
def test_cd_and_ct_learn_the_flow_of_every_path(name):
    """fit_grid (CD with the Heun teacher, and CT; Delta = T/10, 300 iterations in chunks of
    100, one compilation): the mean consistency error over the default (t, s) pairs at
    iteration 300 is below 3/4 of the one at iteration 100 (measured ratios 0.2-0.7 at 200
    against 100) and below the identity map's."""
    path, T = CASES[name]
    pairs = mp.metrics.default_time_pairs(0.02 * T, T)
    key = jax.random.key(1)
    ref = mp.metrics.reference_flows(DATA, pairs, key=key, n=512, path=path)
    identity = mp.consistency_error(lambda x, t, s: x, DATA, pairs, key=key, reference=ref).mean
    for method in ("cd", "ct"):
        cfg = mp.TrainConfig(
            method=method,
            teacher="heun",
            T=T,
            delta=0.02 * T,
            step=T / 10,
            iterations=300,
            batch_size=128,
            width=32,
            depth=2,
            learning_rate=3e-3,
            progress=False,
            chunk_size=100,
            path=path,
        )
        grid, hist = mp.fit_grid(DATA, cfg, steps=[T / 10], seeds=[0], checkpoints=[100])
        assert grid.path == path
        early = mp.consistency_error(hist["checkpoints"][100], DATA, pairs, key=key, reference=ref)
        late = mp.consistency_error(grid, DATA, pairs, key=key, reference=ref)
        assert float(late.mean[0, 0]) < 0.75 * float(early.mean[0, 0]), (method, late, early)
        assert float(late.mean[0, 0]) < float(identity), (method, late.mean, identity)


def test_boundary_form_and_features_follow_the_path(tmp_path):
    """f = (b_s/b_t) x + (a_s - a_t b_s/b_t) g on the path; f(x, t, t) = x at the top time of
    the interpolant too; the time features are finite there; a saved model keeps its path."""
    path = paths.LinearInterpolant()
    skip, out = mp.networks.boundary_coefficients(0.7, 0.2, path)
    np.testing.assert_allclose([skip, out], [0.2 / 0.7, 0.8 - 0.3 * 0.2 / 0.7], rtol=1e-14)
    net = mp.ConsistencyNet(2, width=8, depth=1, key=jax.random.key(0), path=path)
    x = jnp.ones((3, 2), jnp.float32)
    np.testing.assert_array_equal(net(x, 1.0, 1.0), x)
    assert np.all(np.isfinite(np.asarray(net(x, 1.0, 0.0))))
    with pytest.raises(ValueError, match=r"time range \[0, 1\]"):
        net(x, 1.5, 0.5)
    cfg = mp.TrainConfig(
        T=1.0,
        delta=0.05,
        step=0.1,
        iterations=2,
        batch_size=8,
        width=8,
        depth=1,
        progress=False,
        path=path,
    )
    model, _ = mp.fit(DATA, cfg, jax.random.key(0))
    mp.save_model(tmp_path / "m.eqx", model, cfg, data=DATA)
    back = mp.load_model(tmp_path / "m.eqx")
    assert back.path == path and back.config.to_json() == cfg.to_json()
    np.testing.assert_array_equal(back(x[:, :1], 0.9, 0.1), model(x[:, :1], 0.9, 0.1))


def test_a_model_of_a_user_path_saves_and_refuses_to_load_by_name(tmp_path):
    custom = CASES["custom"][0]
    cfg = mp.TrainConfig(T=2.0, width=8, depth=1, path=custom)
    assert json.loads(cfg.to_json())["path"]["path"] == "custom"
    net = mp.ConsistencyNet(1, width=8, depth=1, key=jax.random.key(0), path=custom)
    mp.save_model(tmp_path / "u.eqx", net, cfg)
    with pytest.raises(ValueError, match="trained on a user path"):
        mp.load_model(tmp_path / "u.eqx")


@pytest.mark.parametrize("name", ["ou", "vp", "linear"])
def test_network_derivatives_on_the_diagonal_equal_finite_differences(name):
    """d f / dt and d f / ds at s = t (float64 net) equal central finite differences of the
    same formula (1e-6 relative): the boundary form does not freeze them (d f/dt at s = t is
    -(b'/b) x + (b'/b a - a') g, not 0)."""
    path, _ = CASES[name]
    net = mp.ConsistencyNet(
        2, width=8, depth=1, key=jax.random.key(3), dtype=jnp.float64, path=path
    )
    x, t0, h = jnp.array([0.3, -0.7]), 0.4, 1e-5

    @jax.jit  # one program (eagerly, every operation compiles on its own)
    def derivatives(t0):
        out = []
        for f in (lambda v: net.single(x, v, t0), lambda v: net.single(x, t0, v)):
            out.append((jax.jacfwd(f)(t0), (f(t0 + h) - f(t0 - h)) / (2 * h)))
        return out

    for grad, fd in derivatives(jnp.asarray(t0)):
        np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-9)
        assert np.max(np.abs(np.asarray(grad))) > 1e-3  # not frozen
