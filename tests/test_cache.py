"""mcm_prob.cache.lower_cached: traced programs kept on disk give the same results."""

import errno
import os
import warnings

import jax
import numpy as np
import pytest
import xarray as xr

from mcm_prob import cache, error_models, results


@jax.jit
def _program(y, keys):
    """A vmapped while loop with typed keys and a dict output (the shape of the NUTS run)."""

    def one(level, key):
        def body(c):
            i, x, k = c
            k, sub = jax.random.split(k)
            return i + 1, x + jax.random.uniform(sub), k

        i, x, _ = jax.lax.while_loop(lambda c: c[1] < level, body, (0, 0.0, key))
        return i, x

    i, x = jax.vmap(one)(y, keys)
    return {"steps": i, "total": x}


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "compilation_cache_dir", lambda: str(tmp_path))
    return tmp_path / "exported"


def test_lower_cached_stores_reads_and_recovers(cache_dir, monkeypatch):
    """First call traces and stores one file, exported for the platform the arguments live
    on (on a GPU host the NUTS programs run on a CPU device, not the default backend); a second call reads it without tracing (export
    is made to fail); a corrupted file is traced again and replaced. Every result equals the
    plain jitted program's, bit for bit."""
    args = (np.array([1.0, 3.0, 7.5]), jax.random.split(jax.random.key(0), 3))
    expected = _program(*args)

    def run():
        lowered = cache.lower_cached(_program, args, name="toy", fingerprint="v1")
        out = lowered.compile()(*args)
        for k in expected:
            np.testing.assert_array_equal(out[k], expected[k])

    export, asked = jax.export.export, []
    with monkeypatch.context() as m:  # exported for the arguments' platform, named explicitly
        m.setattr(jax.export, "export", lambda *a, **k: asked.append(k) or export(*a, **k))
        run()
    assert asked == [{"platforms": ("cpu",)}]
    (stored,) = cache_dir.iterdir()
    assert jax.export.deserialize(bytearray(stored.read_bytes())).platforms == ("cpu",)
    with monkeypatch.context() as m:
        m.setattr(jax.export, "export", lambda *a, **k: pytest.fail("traced again"))
        run()
    stored.write_bytes(b"not an exported program")
    run()
    assert stored.read_bytes() != b"not an exported program"
    cache.lower_cached(_program, args, name="toy", fingerprint="v2")  # another fingerprint
    assert len(list(cache_dir.iterdir())) == 2


@pytest.mark.heavy(40)
def test_error_model_draws_equal_with_stored_program(cache_dir, monkeypatch):
    """The power-law model's posterior is identical with the cache off, on (storing) and on
    (reading the stored program)."""
    rng = np.random.default_rng(3)
    steps = np.array([0.05, 0.1, 0.2, 0.4])
    err = xr.DataArray(
        0.3 * steps[:, None] ** 0.7 * np.exp(0.1 * rng.standard_normal((4, 3))),
        dims=("step", "seed"),
        coords={"step": steps, "seed": [0, 1, 2]},
    )
    kw = dict(chains=2, warmup=100, draws=100, seed=1)
    fits = [error_models.fit_error_model(err, "power_law", **kw) for _ in range(2)]
    assert len(list(cache_dir.iterdir())) == 2  # the chains' start and their iterations
    with monkeypatch.context() as m:
        m.setattr(cache, "compilation_cache_dir", lambda: None)
        fits.append(error_models.fit_error_model(err, "power_law", **kw))
    for fit in fits[1:]:
        xr.testing.assert_equal(fit.posterior.to_dataset(), fits[0].posterior.to_dataset())


def test_an_unusable_cache_costs_one_line(tmp_path, monkeypatch):
    """Issue 25, class 9: a cache path that is a file, or a disk too full for the cache, gives
    one warning and the run goes on without a cache (recorded as off, not as that path); a
    cache whose writes fail during a run (JAX warns once per program) shows one line."""
    from jax._src import compilation_cache as jax_cache

    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    a_file = tmp_path / "cache"
    a_file.write_text("")
    try:
        for setting, match in (
            (lambda: monkeypatch.setenv("MCM_PROB_COMPILATION_CACHE", str(a_file)), "is a file"),
            (lambda: jax.config.update("jax_compilation_cache_dir", str(a_file)), "is a file"),
            (lambda: monkeypatch.setattr(cache, "MIN_FREE", 2**62), "MiB free on its disk"),
        ):
            jax.config.update("jax_compilation_cache_dir", None)
            monkeypatch.setenv("MCM_PROB_COMPILATION_CACHE", str(tmp_path / "ok"))
            setting()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                assert cache.enable_compilation_cache() is None
            assert len(caught) == 1 and match in str(caught[0].message)
            assert "running without it" in str(caught[0].message)
            assert cache.compilation_cache_dir() is None
            prov = results.provenance(config_json="{}", seeds=[0], dtype="float64", wall_time=0.0,
                                      study="sampling")  # fmt: skip
            assert prov["compilation_cache"] == "off"

        monkeypatch.setattr(cache, "MIN_FREE", 0)
        assert cache.enable_compilation_cache() == str(tmp_path / "ok")
        jax_cache.reset_cache()

        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(jax_cache, "put_executable_and_time", full)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with cache.cache_warnings_once():
                for k in range(5):  # five new programs, five failed writes
                    jax.jit(lambda x, k=k: x * k + 1.0)(np.arange(3.0 + k))
                warnings.warn("another warning", stacklevel=1)
        texts = [str(w.message) for w in caught]
        assert len(texts) == 2 and "No space left on device" in texts[0], texts
        assert "further compilation-cache errors of this run are not shown" in texts[0]
    finally:
        jax.config.update("jax_compilation_cache_dir", None)
        jax_cache.reset_cache()
