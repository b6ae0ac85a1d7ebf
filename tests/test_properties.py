"""Property tests over the public API (hypothesis): random shapes, dims 1..64, times from 0
through tiny to huge, float32 and float64. Every call either returns a finite result equal to
an independent numpy computation, or raises a `ValueError`/`TypeError` that names the argument
(a backticked name). Nothing non-finite leaves silently."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mcm_prob as mp

TIMES = st.one_of(
    st.sampled_from([0.0, 1e-300, 1e-40, 1e-30, 1e-8, 0.3, 5.0, 34.0, 40.0, 1e4, 1e300]),
    st.floats(0.0, 60.0),
    st.sampled_from([-1.0, float("nan"), float("inf")]),
)
SETTINGS = settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
NAMED = re.compile(r"`[A-Za-z_][\w.\[\]]*`")


def _named_error(err: Exception) -> None:
    assert isinstance(err, (ValueError, TypeError)), repr(err)
    assert NAMED.search(str(err)), f"error does not name the argument: {err}"


def _gaussian(dim: int, seed: int):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    cov = 0.5 * np.eye(dim) + 0.3 * a @ a.T  # eigenvalues in [0.5, ~2]
    mean = rng.normal(size=dim)
    return mean, cov


def _np_alpha_sigma(t: float):
    return np.exp(-t), np.sqrt(-np.expm1(-2 * t))


@pytest.mark.heavy(20)
@pytest.mark.parametrize("x64", [True, False])
@SETTINGS
@given(
    dim=st.integers(1, 64),
    batch=st.sampled_from([(), (1,), (3,), (2, 3)]),
    t=TIMES,
    seed=st.integers(0, 2**16),
)
def test_gaussian_score_and_marginal(x64, dim, batch, t, seed):
    mean, cov = _gaussian(dim, seed)
    x = np.random.default_rng(seed + 1).normal(size=(*batch, dim))
    with jax.enable_x64(x64):
        data = mp.data.Gaussian(jnp.asarray(mean), jnp.asarray(cov))
        try:
            score = np.asarray(data.score(jnp.asarray(x), t), np.float64)
            logp = np.asarray(data.marginal(t).log_prob(jnp.asarray(x)), np.float64)
        except Exception as err:  # noqa: BLE001 - the property is about which errors
            _named_error(err)
            tiny = np.finfo(np.float64 if x64 else np.float32).tiny  # smaller times round to 0
            assert not (np.isfinite(t) and (t == 0 or t >= tiny))
            return
    assert np.isfinite(t) and t >= 0
    dtype = np.float64 if x64 else np.float32
    with np.errstate(over="ignore"):  # 1e300 is inf in float32, as in the library
        tt = float(np.asarray(t, dtype))
    a, s = _np_alpha_sigma(tt)
    cov_t = a**2 * cov + s**2 * np.eye(dim)
    expected = -np.linalg.solve(cov_t, (x - a * mean)[..., None])[..., 0]
    rtol = 1e-9 if x64 else 2e-3
    assert score.shape == x.shape and np.all(np.isfinite(score))
    np.testing.assert_allclose(score, expected, rtol=rtol, atol=rtol)
    _, logdet = np.linalg.slogdet(cov_t)
    maha = np.einsum("...i,...i->...", x - a * mean, -expected)
    np.testing.assert_allclose(
        logp, -0.5 * (maha + logdet + dim * np.log(2 * np.pi)), rtol=rtol, atol=rtol * dim
    )


@pytest.mark.parametrize("x64", [True, False])
@SETTINGS
@given(dim=st.integers(1, 64), t=TIMES, s=TIMES, seed=st.integers(0, 2**16))
def test_gaussian_flow_map(x64, dim, t, s, seed):
    mean, cov = _gaussian(dim, seed)
    x = np.random.default_rng(seed + 1).normal(size=(4, dim))
    with jax.enable_x64(x64):
        data = mp.data.Gaussian(jnp.asarray(mean), jnp.asarray(cov))
        try:
            y = np.asarray(mp.flow_map(data, jnp.asarray(x), t, s), np.float64)
        except Exception as err:  # noqa: BLE001
            _named_error(err)
            return
    assert 0 <= s <= t < np.inf
    dtype = np.float64 if x64 else np.float32
    with np.errstate(over="ignore"):
        tt, ss = float(np.asarray(t, dtype)), float(np.asarray(s, dtype))
    lam, u = np.linalg.eigh(cov)
    (at, st_), (as_, ss_) = _np_alpha_sigma(tt), _np_alpha_sigma(ss)
    ratio = np.sqrt((as_**2 * lam + ss_**2) / (at**2 * lam + st_**2))
    expected = as_ * mean + ((x - at * mean) @ u * ratio) @ u.T
    assert np.all(np.isfinite(y))
    tol = 1e-9 if x64 else 1e-3
    np.testing.assert_allclose(y, expected, rtol=tol, atol=tol * max(1.0, np.abs(expected).max()))


@pytest.mark.parametrize("x64", [True, False])
@settings(max_examples=8, deadline=None, derandomize=True)
@given(
    dim=st.integers(1, 3),
    t=st.one_of(st.sampled_from([0.0, 1e-300, 1e-6, 40.0, 1e5]), st.floats(0.01, 20.0)),
    frac=st.sampled_from([0.0, 0.5, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_ode_flow_of_a_mixture_is_finite_and_invertible(x64, dim, t, frac, seed):
    """Non-Gaussian data by ODE: finite for every accepted time, and the forward flow undoes
    the backward one (to the tolerance of the dtype)."""
    rng = np.random.default_rng(seed)
    with jax.enable_x64(x64):
        data = mp.data.GaussianMixture(
            jnp.array([0.4, 0.6]),
            jnp.asarray(rng.normal(size=(2, dim)) * 2),
            jnp.stack([0.3 * jnp.eye(dim), 0.6 * jnp.eye(dim)]),
        )
        x = jnp.asarray(rng.normal(size=(3, dim)))
        s = frac * t
        try:
            y = mp.flow_map(data, x, t, s)
        except Exception as err:  # noqa: BLE001
            _named_error(err)
            return
        assert np.all(np.isfinite(np.asarray(y)))
        if s > 1e-3:
            back = mp.pf_flow(data, y, s, t)
            tol = 1e-6 if x64 else 2e-2
            np.testing.assert_allclose(back, x, atol=tol * max(1.0, float(jnp.abs(x).max())))


@pytest.mark.parametrize("x64", [True, False])
@settings(max_examples=10, deadline=None, derandomize=True)
@given(
    dim=st.integers(1, 64),
    t=TIMES,
    s=TIMES,
    n=st.sampled_from([1, 3]),
)
def test_consistency_net_is_finite_or_refuses(x64, dim, t, s, n):
    with jax.enable_x64(x64):
        net = mp.ConsistencyNet(dim, width=16, depth=1, key=jax.random.key(0))
        x = jnp.ones((n, dim))
        try:
            y = net(x, t, s)
        except Exception as err:  # noqa: BLE001
            _named_error(err)
            return
        assert 0 <= s <= t < np.inf
        assert y.shape == x.shape and np.all(np.isfinite(np.asarray(y)))
        if s == t:  # f(x, t, t) = x by the parametrisation
            np.testing.assert_allclose(y, x, rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(n=np.int64(8)),
        dict(n=jnp.int32(8)),
        dict(steps=np.int64(3)),
        dict(steps=jnp.int32(3)),
        dict(h=np.float32(0.5)),
        dict(h=jnp.float64(0.5)),
        dict(delta=jnp.asarray(0.01)),
    ],
)
def test_numpy_and_jax_scalars_accepted_alike(kwargs):
    """Defect: numpy and JAX scalars were refused in some places and accepted in others."""
    data = mp.data.Gaussian(jnp.zeros(2), jnp.eye(2))
    base = dict(n=8, dim=2, delta=0.01, h=0.5, steps=3)
    ref = mp.sample(mp.ExactFlow(data), jax.random.key(0), **base).samples
    out = mp.sample(mp.ExactFlow(data), jax.random.key(0), **(base | kwargs)).samples
    np.testing.assert_allclose(out, ref, rtol=1e-6)
    flow = mp.ExactFlow(data, max_steps=np.int64(100))
    assert np.all(np.isfinite(flow(jnp.ones((2, 2)), 1.0, 0.5)))
    with pytest.raises(ValueError, match="`steps` must be an integer"):
        mp.sample(mp.ExactFlow(data), jax.random.key(0), **(base | dict(steps=jnp.float32(3))))


def test_keys_checked_by_name():
    """Every public function that draws takes a typed key (`jax.random.key`) or a raw one
    (`jax.random.PRNGKey`, same draws); anything else (a seed integer, a numpy Generator) is
    refused with an error naming the argument, before any work."""
    data = mp.data.Gaussian(jnp.zeros(2), jnp.eye(2))
    flow = mp.ExactFlow(data)
    base = dict(dim=2, delta=0.01, h=0.5, steps=2)
    typed = mp.sample(flow, jax.random.key(3), 8, **base).samples
    raw = mp.sample(flow, jax.random.PRNGKey(3), 8, **base).samples
    np.testing.assert_array_equal(typed, raw)
    np.testing.assert_array_equal(
        data.sample(jax.random.key(3), 4), data.sample(jax.random.PRNGKey(3), 4)
    )
    cfg = mp.TrainConfig(iterations=2, width=4, depth=1, progress=False)
    calls = {
        "sample": lambda k: mp.sample(flow, k, 8, **base),
        "data.sample": lambda k: data.sample(k, 4),
        "OU.sample": lambda k: mp.OU.sample(k, jnp.zeros(2), 0.5),
        "fit": lambda k: mp.fit(data, cfg, k),
        "consistency_error": lambda k: mp.metrics.consistency_error(
            flow, data, [(1.0, 0.5)], key=k
        ),
        "sample_sde": lambda k: mp.diffusion.sample_sde(data, k, 4, T=2.0, delta=0.01, steps=2),
    }
    for name, call in calls.items():
        for bad in (0, np.random.default_rng(0), jnp.zeros(3)):
            with pytest.raises(TypeError, match="`key` must be a JAX PRNG key"):
                call(bad)
                pytest.fail(f"{name} accepted {bad!r} as a key")
