"""Reliability as users break things: nothing silent, nothing lost, every failure one clear line.

Each test names the defect class of issue 12 it guards (they failed before the fixes)."""

import dataclasses
import errno
import json
import os
import signal
import subprocess
import sys
import time
import types

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st

import mcm_prob as mp
from mcm_prob import cli, results, studies
from mcm_prob.results import load_tree, save_tree

MIX = mp.data.GaussianMixture(
    jnp.array([0.3, 0.7]),
    jnp.array([[-2.0, 0.0], [2.0, 1.0]]),
    jnp.stack([0.3 * jnp.eye(2), jnp.array([[0.5, 0.1], [0.1, 0.4]])]),
)
GAUSS = mp.data.Gaussian(jnp.array([1.0, 2.0]), jnp.array([[1.0, 0.3], [0.3, 0.5]]))

# A small sampling study: 3 cells, about a second each after compilation.
SAMPLING_TOML = (
    "[sampling]\nmax_steps = 3\ntaus = [0.0, inf]\nbaseline_steps = [4, 8]\neps = [0.1, 0.001]\n"
    "n_grid = 201\n"
    '[sampling.data.g1]\nfamily = "gaussian"\nmean = [0.5]\ncov = [[0.5]]\n'
    '[sampling.data.g2]\nfamily = "gaussian"\nmean = [0.5, 0.0]\ncov = [[0.5, 0.2], [0.2, 2.0]]\n'
    '[sampling.data.box2]\nfamily = "uniform_box"\nlow = [-1.0, -1.0]\nhigh = [1.0, 1.0]\n'
)


def _sampling_config(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(SAMPLING_TOML)
    return path, studies.load_config(path, studies.get("sampling"))


def _data_identical(a: xr.DataTree, b: xr.DataTree) -> None:
    """Same groups, variables, coordinates and values (provenance times aside)."""
    assert sorted(n.path for n in a.subtree) == sorted(n.path for n in b.subtree)
    for node in a.subtree:
        xr.testing.assert_equal(node.to_dataset(), b[node.path].to_dataset())


# ------------------------------------------------------------------ exact flows at any time
@pytest.mark.parametrize("t", [34.0, 40.0, 70.0, 1e6])
def test_ode_flow_beyond_t34_matches_closed_form(t):
    """Defect: `flow_map` by ODE failed beyond t ~ 34 ("maximum number of solver steps")."""
    x = jax.random.normal(jax.random.key(0), (5, 2))
    for s in (0.0, 0.5, 12.0):
        ode = mp.flow_map(GAUSS, x, t, s, method="ode")
        np.testing.assert_allclose(ode, mp.flow_map(GAUSS, x, t, s), atol=1e-8)
    back = mp.pf_flow(GAUSS, mp.flow_map(GAUSS, x, t, 1.0), 1.0, t, method="ode")
    np.testing.assert_allclose(back, x, atol=1e-8)  # p_t = N(0, I) there: the flow moves nothing


def test_exact_flow_sampler_with_a_long_horizon():
    """Defect: `sample(ExactFlow(mixture), h=0.5, steps=70)` ended in a traceback (t = 35)."""
    out = mp.sample(
        mp.ExactFlow(MIX), jax.random.key(1), 64, dim=2, delta=1e-3, h=0.5, steps=70, tau=0.0
    )
    assert np.all(np.isfinite(out.samples))
    # a long deterministic horizon lands on p_delta: the mean is right to sampling error
    np.testing.assert_allclose(
        out.samples.mean(0), MIX.sample(jax.random.key(2), 4096).mean(0), atol=0.6
    )


def test_float32_mode_flow_tolerances_and_tiny_times():
    """Defects: in JAX's default 32-bit mode t = 1e-300 passed the checks, rounded to 0 and
    `DiracMixture.score` returned NaN; rtol = 1e-10 cannot be met in float32 (max steps)."""
    with jax.enable_x64(False):
        dirac = mp.data.DiracMixture(jnp.array([[0.0, 0.0], [1.0, 1.0]]), jnp.array([0.5, 0.5]))
        x = jax.random.normal(jax.random.key(0), (4, 2))
        with pytest.raises(ValueError, match=r"`t`=1e-300 rounds to 0 in float32"):
            dirac.score(x, 1e-300)
        assert np.all(np.isfinite(dirac.score(x, 1e-30)))
        g = mp.data.Gaussian(jnp.array([1.0, 2.0]), jnp.array([[1.0, 0.3], [0.3, 0.5]]))
        for t in (1.0, 40.0):
            ode = mp.flow_map(g, x, t, 0.0, method="ode")  # default tolerance 1e-6 in float32
            assert ode.dtype == jnp.float32
            np.testing.assert_allclose(ode, mp.flow_map(g, x, t, 0.0), atol=1e-4)
        with pytest.raises(ValueError, match=r"`rtol`=1e-10 is below what float32 can resolve"):
            mp.flow_map(g, x, 1.0, 0.0, method="ode", rtol=1e-10)


def test_complex_input_refused_by_name():
    """Defect: complex arrays were silently truncated to their real part."""
    x = jnp.ones((3, 2)) * (1 + 1j)
    with pytest.raises(TypeError, match="`x` must be real"):
        mp.flow_map(MIX, x, 1.0, 0.5)
    with pytest.raises(TypeError, match="`t` must be real"):
        MIX.score(jnp.ones((3, 2)), 1.0 + 0.5j)
    with pytest.raises(TypeError, match="`mean` must be real"):
        mp.data.Gaussian(jnp.array([1.0 + 1j]), jnp.eye(1))


# ------------------------------------------------------------------ nothing lost
@pytest.mark.heavy(50)
def test_overwrite_interrupted_keeps_the_earlier_file_byte_identical(tmp_path, capsys):
    """Defect: `--overwrite` replaced the complete file with a partial one at the first cell."""
    toml, cfg = _sampling_config(tmp_path)
    out = tmp_path / "s.nc"
    study = studies.get("sampling")
    studies.run_study(study, cfg, out, progress=False)
    before = out.read_bytes()
    other = dataclasses.replace(cfg, eps=(0.2, 0.001))
    partial = studies.run_study(study, other, out, overwrite=True, progress=False, stop_after=1)
    assert partial.attrs["status"] == "partial"
    assert out.read_bytes() == before
    staged = studies.staging_path(out)
    assert staged.exists() and int(load_tree(staged)["results"]["done"].sum()) == 1
    # the same call continues the staged file and only then replaces `out`
    done = studies.run_study(study, other, out, overwrite=True, progress=False)
    assert done.attrs["status"] == "complete" and not staged.exists()
    assert json.loads(done.attrs["config"])["eps"] == [0.2, 0.001]
    fresh = studies.run_study(study, other, tmp_path / "fresh.nc", progress=False)
    _data_identical(done, fresh)


@pytest.mark.parametrize("overwrite", [False, True])
def test_disk_full_keeps_the_earlier_file_and_exits_with_a_message(
    tmp_path, monkeypatch, capsys, overwrite
):
    """Defect: a disk-full write printed an h5py traceback and the process segfaulted."""
    toml, cfg = _sampling_config(tmp_path)
    out = tmp_path / "s.nc"
    if overwrite:
        studies.run_study(studies.get("sampling"), cfg, out, progress=False)
        before = out.read_bytes()
    real_fsync = os.fsync
    writes = []

    def full(fd):
        writes.append(fd)
        if len(writes) >= 2:  # the second save of this run finds the disk full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(results.os, "fsync", full)
    argv = ["run", "sampling", "--config", str(toml), "--out", str(out), "--no-progress"]
    assert cli.main(argv + (["--overwrite"] if overwrite else [])) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and str(out) in err
    assert not list(tmp_path.glob("*.tmp"))
    if overwrite:
        assert out.read_bytes() == before
    else:  # the first cell's save went through: the file holds it, partial
        assert int(load_tree(out)["results"]["done"].sum()) == 1


def test_failed_analysis_leaves_partial_and_resume_reruns_only_the_analysis(tmp_path, monkeypatch):
    """Defects: a failure during the analysis left a file some commands called complete;
    `--resume` then redid nothing useful and a corrected analysis-only key was refused."""
    study = studies.get("estimation")
    assert set(study.analysis_keys) >= {"n_boot", "ci", "chains"}
    _, cfg = _sampling_config(tmp_path)
    sampling = studies.get("sampling")
    out = tmp_path / "s.nc"

    def broken(self, c, ds, *, progress):
        raise RuntimeError("analysis failed")

    monkeypatch.setattr(type(sampling), "finalize", broken)
    with pytest.raises(RuntimeError, match="analysis failed"):
        studies.run_study(sampling, cfg, out, progress=False)
    tree = load_tree(out)
    assert tree.attrs["status"] == "partial" and bool(tree["results"]["done"].all())
    monkeypatch.undo()
    ran = []
    monkeypatch.setattr(type(sampling), "run_cell", lambda *a, **k: ran.append(1))
    monkeypatch.setattr(type(sampling), "analysis_keys", ("eps",))  # as if eps were analysis-only
    later = dataclasses.replace(cfg, eps=(0.2, 0.001))
    tree = studies.run_study(sampling, later, out, resume=True, progress=False)
    assert ran == [] and tree.attrs["status"] == "complete" and "fits" in tree.children
    assert json.loads(json.loads(tree.attrs["previous_configs"])[0])["eps"] == [0.1, 0.001]
    assert json.loads(tree.attrs["config"])["eps"] == [0.2, 0.001]
    other = dataclasses.replace(cfg, h=0.25)
    with pytest.raises(ValueError, match=r"different config.*h: 0.5 in the file, 0.25 now"):
        studies.run_study(sampling, other, out, resume=True, progress=False)


def test_stale_temp_files_removed_and_umask_respected(tmp_path):
    """Defects: a killed write left a `.tmp` orphan nothing removed; files were 0600."""
    _, cfg = _sampling_config(tmp_path)
    out = tmp_path / "s.nc"
    orphan = tmp_path / "s.nc.12345-deadbeef.tmp"
    orphan.write_bytes(b"\0" * 1000)
    other = tmp_path / "keep.tmp"
    other.write_bytes(b"x")
    old = os.umask(0o027)
    try:
        studies.run_study(studies.get("sampling"), cfg, out, progress=False, stop_after=1)
    finally:
        os.umask(old)
    assert not orphan.exists() and other.exists()
    assert out.stat().st_mode & 0o777 == 0o640


def test_output_location_checked_before_any_work(tmp_path, monkeypatch, capsys):
    """Defects: `--out` under a file, an existing directory or a read-only folder gave a
    traceback after the first cell had run."""
    toml, _ = _sampling_config(tmp_path)
    ran = []
    monkeypatch.setattr(type(studies.get("sampling")), "run_cell", lambda *a, **k: ran.append(1))
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    base = ["run", "sampling", "--config", str(toml), "--no-progress", "--out"]
    for out, message in [
        (tmp_path / "afile" / "s.nc", "is a file, not a directory"),
        (tmp_path / "adir", "is a directory"),
    ]:
        assert cli.main(base + [str(out)]) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1

    # a read-only folder (simulated: tests run as root, where chmod does not stop writes)
    def read_only(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr("tempfile.mkstemp", read_only)
    assert cli.main(base + [str(tmp_path / "ro" / "s.nc")]) == 1
    err = capsys.readouterr().err
    assert "Read-only file system" in err and "cannot write results to" in err
    assert ran == []


def test_config_directory_gives_a_message(tmp_path, capsys):
    argv = ["run", "sampling", "--config", str(tmp_path), "--out", str(tmp_path / "o.nc")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "is not a file" in err and err.count("\n") == 1


# ------------------------------------------------------------------ untrusted files
def test_info_reads_attributes_only_escapes_and_bounds_them(tmp_path, monkeypatch, capsys):
    """Defects: `info` printed attributes raw (escape sequences) and in full, loaded every
    array, and crashed on a malformed `config`."""
    tree = xr.DataTree.from_dict(
        {"/results": xr.Dataset({"big": ("x", np.zeros(1000))}, attrs={"spec:a": "\x1b[31mred"})}
    )
    tree.attrs = {
        "study": "sampling\x1b[2J",
        "config": "{not json",
        "versions": json.dumps({"jax": "1"}),
        "note": "y" * 100_000,
    }
    path = save_tree(tree, tmp_path / "hostile.nc")
    monkeypatch.setattr(results, "load_tree", lambda *a: pytest.fail("info loaded the arrays"))
    monkeypatch.setattr(xr, "open_datatree", lambda *a, **k: pytest.fail("info opened arrays"))
    assert cli.main(["info", str(path)]) == 0
    text = capsys.readouterr().out
    assert "\x1b" not in text and "\\x1b[2J" in text and "\\x1b[31mred" in text
    assert "config: <malformed: not valid JSON> {not json" in text
    assert "(100000 characters in all)" in text and len(text) < 5000
    tree.attrs["config"] = json.dumps([1, 2])
    save_tree(tree, path)
    assert cli.main(["info", str(path)]) == 0
    (tmp_path / "garbage.nc").write_bytes(b"not hdf5 at all")
    assert cli.main(["info", str(tmp_path / "garbage.nc")]) == 1
    assert "not a netCDF-4 file" in capsys.readouterr().err


def test_report_prints_the_table_before_a_failing_plot(tmp_path, monkeypatch, capsys):
    """Defects: `report` in a read-only folder lost the table (the PNG was saved first); a file
    the study cannot summarise gave a traceback; a full disk replaced the earlier plot with a
    truncated one (issue 25, class 9)."""
    _, cfg = _sampling_config(tmp_path)
    out = tmp_path / "s.nc"
    studies.run_study(studies.get("sampling"), cfg, out, progress=False)

    def no_write(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    def no_space():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    import matplotlib.figure

    assert cli.main(["report", str(out)]) == 0
    png = tmp_path / "s_sampling.png"
    earlier = png.read_bytes()
    capsys.readouterr()
    with monkeypatch.context() as m:  # the disk fills while the new plot is written
        m.setattr(results.os, "fsync", lambda fd: no_space())
        assert cli.main(["report", str(out)]) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert png.read_bytes() == earlier and list(tmp_path.glob("*.tmp")) == []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", no_write)
    assert cli.main(["report", str(out)]) == 1
    captured = capsys.readouterr()
    assert "steps" in captured.out and "g2" in captured.out
    assert "could not save the plot" in captured.err and captured.err.count("\n") == 1
    broken = load_tree(out)
    broken["results"] = xr.DataTree(broken["results"].to_dataset().drop_vars("kl"))
    save_tree(broken, tmp_path / "broken.nc")
    assert cli.main(["report", str(tmp_path / "broken.nc")]) == 1
    assert "cannot summarise this sampling file" in capsys.readouterr().err


# ------------------------------------------------------------------ SIGKILL series
def _mtime(path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


@pytest.mark.heavy(80)
def test_sigkill_series_resumes_to_the_uninterrupted_result(tmp_path):
    """Kills at random points of a small study (computing, saving, analysing), each followed
    by `--resume`: the final file holds the same data as an uninterrupted run, and no temporary
    file is left behind. A kill waits for the run's next save (the file appears or changes),
    then a random fraction of a second, so it lands mid-run on a slow or a fast machine."""
    toml, cfg = _sampling_config(tmp_path)
    reference = studies.run_study(studies.get("sampling"), cfg, tmp_path / "ref.nc", progress=False)
    out = tmp_path / "killed.nc"
    rng = np.random.default_rng(12)
    env = os.environ | {"JAX_PLATFORMS": "cpu"}
    kills, resumed = 0, 0
    for attempt in range(12):
        argv = [sys.executable, "-m", "mcm_prob.cli", "run", "sampling", "--config", str(toml)]
        argv += ["--out", str(out), "--no-progress"] + (["--resume"] if out.exists() else [])
        resumed += out.exists()
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if attempt < 3:
            saved, give_up = _mtime(out), time.monotonic() + 300
            while proc.poll() is None and _mtime(out) == saved and time.monotonic() < give_up:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 1.0))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
        _, err = proc.communicate(timeout=300)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, err.decode()
    assert kills >= 2 and resumed >= 1
    final = load_tree(out)
    assert final.attrs["status"] == "complete"
    _data_identical(final, reference)
    assert not list(tmp_path.glob("*.tmp"))


def test_error_model_settings_refused_before_any_model_is_traced(monkeypatch):
    """Defect class: validation after heavy work (bad NUTS settings surfaced after tracing)."""
    import mcm_prob.error_models as em

    monkeypatch.setattr(em, "_lower", lambda *a, **k: pytest.fail("a model was traced"))
    errors = xr.DataArray(
        np.random.default_rng(0).uniform(0.1, 1.0, (3, 4)),
        dims=("step", "seed"),
        coords={"step": [0.1, 0.2, 0.4]},
    )
    with pytest.raises(ValueError, match="`chains` must be an integer"):
        mp.fit_error_models(errors, ("power_law", "two_term"), workers=2, chains=1)
    with pytest.raises(ValueError, match="`target_accept` must be"):
        mp.fit_error_models(errors, ("power_law", "two_term"), workers=2, target_accept=1.5)


@pytest.mark.heavy(45)
def test_one_writer_per_output(tmp_path, capsys):
    """Issue 25, class 2 (two writers, one file): while one run writes `--out`, a second run
    (CLI or Python, run or merge) is refused at once, naming the first run's process; the
    first completes. A holder killed with SIGKILL leaves a lock file that blocks nothing."""
    from mcm_prob.locks import OutputBusy, lock_path, writer_lock

    cfg, out = tmp_path / "s.toml", tmp_path / "s.nc"
    cfg.write_text(SAMPLING_TOML)
    first = subprocess.Popen(
        [sys.executable, "-m", "mcm_prob.cli", "run", "sampling", "--config", str(cfg)]
        + ["--out", str(out), "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not lock_path(out).exists() or not lock_path(out).read_text():
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.05)
    second = ["run", "sampling", "--config", str(cfg), "--out", str(out), "--no-progress"]
    assert cli.main(second) == 1
    err = capsys.readouterr().err
    assert f"is being written by process {first.pid} on " in err and "mcm_prob/cli.py" in err
    with pytest.raises(OutputBusy, match=f"process {first.pid}"):
        studies.merge("sampling", studies.SamplingConfig(), [tmp_path / "p.nc"], out)
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-2000:]
    assert load_tree(out).attrs["status"] == "complete" and not lock_path(out).exists()
    # a killed holder: its lock file stays but the kernel released the lock
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom mcm_prob.locks import writer_lock\n"
         "with writer_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(300)",
         str(out)],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert lock_path(out).exists()
    with writer_lock(out):
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()
    assert not lock_path(out).exists()


def test_untrusted_model_files_are_checked_before_use(tmp_path):
    """Issue 25, class 4: hostile model files (written here from a good one) are refused by
    `load_model` with the reason, before anything large is built: non-finite weights, a header
    whose network disagrees with the arrays, non-integer or out-of-bound fields, a header
    announcing a huge network, bytes after the last array, a deeply nested header, float64
    weights in float32 mode."""
    cfg = mp.TrainConfig(width=8, depth=1, progress=False)
    net = mp.ConsistencyNet(2, width=8, depth=1, key=jax.random.key(0))
    good = tmp_path / "good.eqx"
    mp.save_model(good, net, cfg)
    assert mp.load_model(good).net.mlp.width_size == 8
    line, rest = good.read_bytes().split(b"\n", 1)
    header = json.loads(line)

    def hostile(name, *, net=None, tail=b"", raw=None):
        h = json.loads(json.dumps(header))
        h["network"].update(net or {})
        path = tmp_path / f"{name}.eqx"
        path.write_bytes((raw if raw is not None else json.dumps(h).encode()) + b"\n" + rest + tail)
        return path

    cases = {
        "width": (hostile("width", net={"width": 16}), "do not match the header's network"),
        "depth": (hostile("depth", net={"depth": 2}), "do not match the header's network"),
        "dim": (hostile("dim", net={"dim": 2.5}), r"'dim' must be an integer in \[1, "),
        "layers": (hostile("layers", net={"depth": 20_000}), r"'depth' must be an integer"),
        "huge": (hostile("huge", net={"width": 30_000, "depth": 2}), "more than `max_parameters`"),
        "tail": (hostile("tail", tail=b"\x00" * 7), "7 bytes after the network's last array"),
        "nested": (hostile("nested", raw=b"[" * 100_000 + b"]" * 100_000), "not a mcm_prob saved"),
        "dtype": (hostile("dtype", net={"dtype": "int8"}), "'dtype' must be float32 or float64"),
    }
    for path, message in cases.values():
        with pytest.raises(ValueError, match=message):
            mp.load_model(path)
    first = net.mlp.layers[0].weight
    nan_net = eqx.tree_at(lambda n: n.mlp.layers[0].weight, net, first.at[0, 0].set(jnp.nan))
    mp.save_model(tmp_path / "nan.eqx", nan_net, cfg)
    with pytest.raises(ValueError, match="non-finite"):
        mp.load_model(tmp_path / "nan.eqx")
    cfg64 = mp.TrainConfig(width=8, depth=1, progress=False, dtype="float64")
    net64 = mp.ConsistencyNet(2, width=8, depth=1, dtype="float64", key=jax.random.key(0))
    mp.save_model(tmp_path / "f64.eqx", net64, cfg64)
    jax.config.update("jax_enable_x64", False)
    try:
        with pytest.raises(ValueError, match="saved in float64; enable JAX's x64 mode"):
            mp.load_model(tmp_path / "f64.eqx")
    finally:
        jax.config.update("jax_enable_x64", True)
    assert mp.load_model(tmp_path / "f64.eqx").net.dtype == jnp.float64


def test_non_finite_results_never_leave_silently():
    """Issue 25, class 5: a score that float64 cannot evaluate (|x| = 1e200 for the box and
    the Dirac mixture) raises, eagerly and under jit, instead of returning NaN; a network
    given NaN or inf input refuses it by name."""
    x = jnp.array([[1e200, 0.0], [0.5, -0.2]])
    for data in (
        mp.data.UniformBox([-1.0, -1.0], [1.0, 2.0]),
        mp.data.DiracMixture([[0.0, 1.0], [1.0, 0.0]]),
    ):
        ok = data.score(x[1:], 0.5)
        assert bool(jnp.all(jnp.isfinite(ok)))
        assert not bool(jnp.all(jnp.isfinite(data.unchecked_score(x, 0.5))))  # overflows
        with pytest.raises(
            FloatingPointError,
            match=r"score is not finite at points of magnitude up to 1e\+200: beyond",
        ):
            data.score(x, 0.5)
        with pytest.raises(Exception, match="score is not finite"):
            jax.jit(lambda y, d=data: d.score(y, 0.5))(x).block_until_ready()
    net = mp.ConsistencyNet(2, width=8, depth=1, key=jax.random.key(0))
    for bad in (jnp.nan, jnp.inf):
        with pytest.raises(ValueError, match="`x` must be finite"):
            net(x.at[1, 1].set(bad), 1.0, 0.5)


LIMIT = 2**20  # bytes: the guard's limit in the test below


@settings(max_examples=25, deadline=None)
@given(scale=st.floats(0.25, 4.0), which=st.sampled_from(["n", "steps", "width", "draws"]))
def test_resource_guard_refuses_sizes_past_its_limit_before_allocating(scale, which):
    """Issue 25, class 1: sizes drawn across the guard's boundary (MCM_PROB_MEMORY_LIMIT = 1 MiB
    here): below it the call runs and what it returns fits the limit; above it the call is
    refused with a ValueError naming the argument, before anything is allocated."""
    key = jax.random.key(0)
    errs = xr.DataArray(
        np.exp(np.random.default_rng(0).normal(size=(3, 4))),
        dims=("step", "seed"),
        coords={"step": [0.1, 0.2, 0.4]},
    )
    calls = {  # argument -> (value at the boundary, the call)
        "n": (LIMIT // 64, lambda v: mp.sample(lambda x, t, s: x, key, v, dim=2, delta=0.1, h=0.1, steps=2).samples),
        "steps": (LIMIT // 64, lambda v: mp.Schedule.constant(delta=0.1, h=1e-3, steps=v).t),
        "width": (150, lambda v: mp.ConsistencyNet(2, width=v, depth=2, key=key)),
        "draws": (LIMIT // (8 * 2 * 52), lambda v: mp.fit_error_model(errs, "power_law", chains=2, warmup=10, draws=v).attrs),
    }  # fmt: skip
    boundary, call = calls[which]
    value = max(10, int(boundary * scale))
    old = os.environ.get("MCM_PROB_MEMORY_LIMIT")
    os.environ["MCM_PROB_MEMORY_LIMIT"] = str(LIMIT)
    try:
        if scale > 1.2:  # past the limit: refused by name
            with pytest.raises(
                ValueError, match=f"`{which}` asks for .* more than the limit of 1 MiB"
            ):
                call(value)
        elif scale < 0.8 and which != "draws":  # within: runs, and its arrays fit the limit
            out = call(value)
            assert sum(a.nbytes for a in jax.tree.leaves(eqx.filter(out, eqx.is_array))) <= LIMIT
    finally:
        if old is None:
            del os.environ["MCM_PROB_MEMORY_LIMIT"]
        else:
            os.environ["MCM_PROB_MEMORY_LIMIT"] = old


def test_error_models_from_an_unguarded_script_run_its_top_level_once(tmp_path):
    """Issue 25, class 8: `fit_error_models(..., workers=2)` from a script without an
    `if __name__ == "__main__"` guard runs the script's top level once (threads, not worker
    processes that re-import `__main__`) and finishes."""
    script = tmp_path / "unguarded.py"
    script.write_text(
        "import jax\njax.config.update('jax_enable_x64', True)\n"
        "import numpy as np, xarray as xr\nimport mcm_prob as mp\n"
        "print('top level', flush=True)\n"
        "e = xr.DataArray(np.exp(np.random.default_rng(0).normal(size=(2, 3, 4))),\n"
        "    dims=('g', 'step', 'seed'), coords={'step': [0.1, 0.2, 0.4]})\n"
        "fits = mp.fit_error_models(e, ('power_law', 'gp'), workers=2, chains=2, warmup=20, draws=20)\n"
        "print(sorted(fits))\n"
    )
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.splitlines() == ["top level", "['gp', 'power_law']"]


def test_resume_and_merge_check_the_file_they_continue(tmp_path):
    """Issue 25, class 3: a complete file is not resumed as a part (it stayed complete), a
    part's file only as that part, and a file whose layout differs from its config (an extra
    entry, a missing variable) or whose done cells hold only NaN is refused by name, in resume and merge alike, instead of a
    KeyError later; the refused files are unchanged."""
    _, cfg = _sampling_config(tmp_path)
    sampling = studies.get("sampling")
    whole, part0 = tmp_path / "whole.nc", tmp_path / "p0.nc"
    studies.run_study(sampling, cfg, whole, progress=False)
    studies.run_study(sampling, cfg, part0, progress=False, part=(0, 2))
    before = whole.read_bytes()
    with pytest.raises(
        ValueError, match=r"holds the whole run \(complete\); cannot resume it as part 1/2"
    ):
        studies.run_study(sampling, cfg, whole, resume=True, progress=False, part=(1, 2))
    with pytest.raises(
        ValueError, match=r"holds part 0/2 \(partial\); cannot resume it as part 1/2"
    ):
        studies.run_study(sampling, cfg, part0, resume=True, progress=False, part=(1, 2))
    assert whole.read_bytes() == before
    tree = load_tree(whole)
    res = tree["results"].to_dataset()
    extra = xr.concat([res, res.isel(entry=[0]).assign_coords(entry=["added"])], "entry")
    missing = res.drop_vars("done")
    for name, ds in (("extra", extra), ("missing", missing)):
        bad = tmp_path / f"{name}.nc"
        doc = tree.copy()
        doc["results"] = xr.DataTree(ds)
        save_tree(doc, bad)
        with pytest.raises(ValueError, match="does not have the layout of its config"):
            studies.run_study(sampling, cfg, bad, resume=True, progress=False)
        with pytest.raises(ValueError, match="does not have the layout of its config"):
            studies.merge("sampling", cfg, [bad], tmp_path / f"m_{name}.nc")
    with pytest.raises(ValueError, match="coordinate 'entry' is"):
        studies.run_study(sampling, cfg, tmp_path / "extra.nc", resume=True, progress=False)
    with pytest.raises(ValueError, match="variable 'done' missing"):
        studies.run_study(sampling, cfg, tmp_path / "missing.nc", resume=True, progress=False)
    faked = tree.copy()  # done flags over values that were never computed
    faked["results"] = xr.DataTree(
        res.map(lambda v: v.where(v.entry != "g2") if v.dtype.kind == "f" else v)
    )
    save_tree(faked, tmp_path / "faked.nc")
    for run in (
        lambda: studies.run_study(
            sampling, cfg, tmp_path / "faked.nc", resume=True, progress=False
        ),
        lambda: studies.merge("sampling", cfg, [tmp_path / "faked.nc"], tmp_path / "m.nc"),
    ):
        with pytest.raises(
            ValueError, match=r"marks 1 cell\(s\) done that hold no results .*entry=g2"
        ):
            run()


def test_messages_name_the_users_argument(tmp_path, capsys):
    """Issue 25, class 7: what was refused by a library's message (or hung) now names the
    argument or file: a family that is not a string, an overflowing horizon, no start
    schedules, an empty group dim, a non-ASCII --part, a FIFO given to report, a ragged
    mean, times float64 cannot tell apart, an optimiser whose runs collapse, a Gaussian KL
    against a singular covariance."""
    with pytest.raises(ValueError, match="data spec key 'family' must be one of"):
        mp.data.from_spec({"family": {"nested": 1}})
    with pytest.raises(ValueError, match="data spec key 'family' must be one of"):
        mp.data.from_spec({"family": ["gaussian"]})
    for make in (mp.Schedule.karras, mp.Schedule.song):
        with pytest.raises(ValueError, match="overflows float64 at T = 400"):
            make(T=400.0, delta=0.01, steps=3)
    with pytest.raises(ValueError, match="`starts` must hold at least one Schedule"):
        mp.optimal_schedule(GAUSS, 2, T=2.0, delta=0.01, starts=[], n_random=0)
    errs = xr.DataArray(np.ones((0, 3, 2)), dims=("g", "step", "seed"),
                        coords={"step": [0.1, 0.2, 0.4]})  # fmt: skip
    with pytest.raises(ValueError, match=r"group dim\(s\) \['g'\] are empty"):
        mp.fit_error_model(errs, "power_law")
    assert (
        cli.main(
            ["run", "sampling", "--quick", "--part", "\u00b2/2", "--out", str(tmp_path / "x.nc")]
        )
        == 1
    )
    assert "--part must look like I/N" in capsys.readouterr().err
    fifo = tmp_path / "pipe.nc"
    os.mkfifo(fifo)
    assert cli.main(["report", str(fifo)]) == 1  # returns at once instead of waiting on it
    assert "is not a regular file" in capsys.readouterr().err
    with pytest.raises(ValueError, match="`mean` must be a rectangular array of numbers"):
        mp.data.from_spec({"family": "gaussian", "mean": [[0.0, 1.0], [1.0]], "cov": [[1.0]]})
    with pytest.raises(ValueError, match="`T` gives 3 step.* within float64's resolution"):
        mp.Schedule.fixed_horizon(T=np.nextafter(0.01, 1), delta=0.01, steps=3)
    with pytest.raises(ValueError, match="`h` gives 2 step.* within float64's resolution"):
        mp.Schedule.constant(delta=1.0, h=1e-17, steps=2)
    with pytest.raises(ValueError, match="`learning_rate`=1000 drove 3 of 3 runs"):
        mp.optimal_schedule(GAUSS, 3, T=2.0, delta=0.01, learning_rate=1e3, iterations=20,
                            n_random=0)  # fmt: skip
    singular = types.SimpleNamespace(mean=np.zeros(2), covariance_matrix=np.ones((2, 2)))
    with pytest.raises(ValueError, match="`q` must have a positive-definite covariance"):
        mp.metrics.kl_gaussian(GAUSS.marginal(0.1), singular)


def test_counts_that_multiply_the_work_are_refused_up_front(tmp_path, capsys, monkeypatch):
    """Issue 25, class 1 (work, not memory): a config list of more than 1000 entries (seeds,
    steps), the sampling study's max_steps = 1e12, a config's n_grid = 1e6 and a fit_grid of
    more models than memory holds are refused by name before any work; MCM_PROB_MAX_ENTRIES
    lifts the count cap."""
    many = "[" + ", ".join(str(i) for i in range(1001)) + "]"
    for study, text, name, said in (
        ("estimation", f"[estimation]\nseeds = {many}\n", "seeds", "has 1001 entries, more than 1000"),
        ("error_injection", f"[error_injection]\nsteps = {[i + 1 for i in range(1001)]}\n", "steps", "more than 1000"),
        ("sampling", "[sampling]\nmax_steps = 1000000000000\nh = 1e-13\n", "max_steps", "more than 1000"),
        ("schedules", "[schedules]\nn_grid = 1000000\n", "n_grid", "asks for 1 kernel(s) of 1002000^2"),
    ):  # fmt: skip
        cfg = tmp_path / f"{name}.toml"
        cfg.write_text(text)
        out = tmp_path / f"{name}.nc"
        assert cli.main(["run", study, "--config", str(cfg), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"`{name}` " in err and said in err and err.count("\n") == 1, err
        assert not out.exists()
    monkeypatch.setenv("MCM_PROB_MAX_ENTRIES", "2000")
    cfg = studies.load_config(tmp_path / "steps.toml", studies.get("error_injection"))
    assert len(cfg.steps) == 1001
    monkeypatch.setenv("MCM_PROB_MEMORY_LIMIT", "1G")
    with pytest.raises(
        ValueError, match=r"`steps` x `seeds` asks for 100,000 models \(2 steps x 50000 seeds\)"
    ):
        mp.fit_grid(GAUSS, mp.TrainConfig(progress=False), steps=[0.1, 0.2], seeds=range(50_000))


def test_valid_looking_calls_that_would_give_wrong_answers_are_refused():
    """Issue 25, class 6: a grid that misses the mass, a trained model outside its range in
    `grid_law_1d` and `product_kl` (as `sample` refuses it), an `f` with two columns,
    `compare_error_models` over fits of different data; and `optimal_schedule` in float32
    mode computes in float64 (its KLs equal float64's, not float32's round-off floor)."""
    g1 = mp.data.Gaussian([0.5], [[0.4]])
    kw = dict(delta=0.01, h=0.5, steps=2)
    with pytest.raises(ValueError, match=r"misses mass 0\.9\d+ of the start law .*`grid`"):
        mp.gridlaw.grid_law_1d(g1, grid=np.linspace(-0.01, 0.01, 101), **kw)
    with pytest.raises(ValueError, match=r"misses mass .* of the start law .*`half_width`"):
        mp.gridlaw.grid_law_1d(g1, half_width=3.0, **kw)
    with pytest.raises(ValueError, match=r"misses mass .* of p_delta"):  # the data off the grid
        mp.gridlaw.grid_law_1d(
            mp.data.Gaussian([30.0], [[0.4]]), grid=np.linspace(-10, 10, 2001), **kw
        )
    cfg = mp.TrainConfig(delta=0.05, T=2.0, width=8, depth=1, progress=False)
    model = mp.TrainedModel(mp.ConsistencyNet(1, width=8, depth=1, key=jax.random.key(0)), cfg)
    with pytest.raises(ValueError, match=r"outside the time range it was trained on \[0\.05, 2\]"):
        mp.gridlaw.grid_law_1d(g1, f=model, n_grid=201, **kw)
    with pytest.raises(ValueError, match="outside the time range it was trained on"):
        mp.gridlaw.product_kl([g1, g1], f=mp.gridlaw.coordinate_maps(model, 1, mp.Schedule.constant(**kw)) * 2,
                      n_grid=201, **kw)  # fmt: skip
    inside = mp.gridlaw.grid_law_1d(g1, f=model, n_grid=201, delta=0.05, h=0.5, steps=2)
    assert np.isfinite(inside.kl)
    with pytest.raises(ValueError, match=r"`f` must return shape \(n, 1\) for 1-d data"):
        mp.gridlaw.grid_law_1d(g1, f=lambda x, t, s: jnp.concatenate([x, x], 1), n_grid=201, **kw)

    def fitted(values):
        obs = xr.Dataset({"log_error": (("step", "seed"), np.asarray(values))})
        return xr.DataTree.from_dict({"observed_data": obs})

    with pytest.raises(ValueError, match=r"`errors\['b'\]` was fitted to other errors"):
        mp.compare_error_models({"a": fitted([[1.0, 2.0]]), "b": fitted([[1.0, 2.5]])})

    with jax.enable_x64(True):
        res64 = mp.optimal_schedule(GAUSS, 2, T=1.5, delta=0.02, iterations=30, n_random=0)
    with jax.enable_x64(False):
        g32 = mp.data.Gaussian(jnp.array([1.0, 2.0]), jnp.array([[1.0, 0.3], [0.3, 0.5]]))
        res32 = mp.optimal_schedule(g32, 2, T=1.5, delta=0.02, iterations=30, n_random=0)
    # the parameters of g32 are GAUSS's rounded to float32: KLs agree to float32's 1e-7
    np.testing.assert_allclose(res32.start_kl, res64.start_kl, rtol=1e-5)
    assert res32.kl == pytest.approx(res64.kl, rel=1e-4)
