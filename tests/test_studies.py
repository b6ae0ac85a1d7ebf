"""Studies, results files, resume after interruption, config validation and the CLI."""

import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import netCDF4
import numpy as np
import pytest
import xarray as xr

import mcm_prob as mp
from mcm_prob import cli, studies
from mcm_prob.results import load_tree, save_tree
from mcm_prob.training import teacher_map

TINY_ESTIMATION = dict(
    steps=(0.2, 0.4),
    seeds=(0, 1),
    iterations=40,
    width=8,
    batch_size=32,
    eval_samples=64,
    sample_size=64,
    n_boot=100,
    chains=2,
    warmup=50,
    draws=50,
)
TINY_SAMPLING = dict(
    dims=(1, 2),
    max_steps=3,
    taus=(0.0, float("inf")),
    baseline_steps=(4, 8),
    eps=(0.1,),
    n_grid=201,
)


def test_results_round_trip_and_netcdf4(tmp_path):
    ds = xr.Dataset(
        {
            "err": (
                ("regime", "step"),
                np.arange(6.0).reshape(2, 3),
                {"long_name": "error", "units": "u"},
            ),
            "done": (("regime",), np.array([True, False]), {"long_name": "finished"}),
        },
        coords={
            "regime": ["smooth", "nonsmooth"],
            "step": ("step", [0.1, 0.2, 0.4], {"units": "OU time"}),
        },
    )
    post = xr.Dataset({"alpha": (("chain", "draw"), np.random.default_rng(0).normal(size=(2, 5)))})
    tree = xr.DataTree.from_dict(
        {"/results": ds, "/posterior": post, "/posterior/diagnostics": xr.Dataset({"r_hat": 1.001})}
    )
    tree.attrs = {"config": json.dumps({"a": 1}), "wall_time_s": 1.5, "flag": True}
    path = save_tree(tree, tmp_path / "x.nc")
    back = load_tree(path)
    xr.testing.assert_identical(back["results"].to_dataset(), ds)
    xr.testing.assert_identical(back["posterior"].to_dataset(), post)
    assert back.attrs["config"] == json.dumps({"a": 1}) and back.attrs["flag"] == "true"
    with netCDF4.Dataset(path) as nc:
        assert {"results", "posterior"} <= set(nc.groups)
        assert "diagnostics" in nc.groups["posterior"].groups
        np.testing.assert_array_equal(nc.groups["results"].variables["err"][:], ds["err"].values)
    assert not list(tmp_path.glob("*.tmp"))


def test_teacher_map_convergence_orders():
    """The composed teacher map converges to the exact flow at order 1 (Euler) and 2 (Heun):
    halving Delta divides the mean squared error by 4 and 16 (within 20%)."""
    g = mp.data.Gaussian([1.0, -0.5], [[1.0, 0.3], [0.3, 0.5]])
    x = g.marginal(1.61).sample(jax.random.key(0), (2000,))
    exact = mp.flow_map(g, x, 1.61, 0.01)

    def err(step, teacher):
        y = teacher_map(g, x, 1.61, 0.01, step=step, teacher=teacher)
        return float(jnp.mean(jnp.sum((y - exact) ** 2, -1)))

    assert abs(err(0.1, "euler") / err(0.05, "euler") / 4 - 1) < 0.2
    assert abs(err(0.1, "heun") / err(0.05, "heun") / 16 - 1) < 0.2
    assert err(0.4, "exact") < 1e-20
    with pytest.raises(ValueError, match="must be an integer"):
        teacher_map(g, x, 1.61, 0.01, step=0.3)


def test_estimation_resume_after_interruption(tmp_path, monkeypatch):
    """A study interrupted after its first cell resumes from the partial file: finished cells
    are not recomputed and their numbers are kept; the finished file has the rate analysis."""
    cfg = studies.EstimationConfig(**TINY_ESTIMATION)
    out = tmp_path / "est.nc"
    real_cell = studies._estimation_cell
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(args[2:4])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_cell(*args, **kwargs)

    monkeypatch.setattr(studies, "_estimation_cell", interrupted)
    with pytest.raises(KeyboardInterrupt):
        studies.run_estimation(cfg, out, progress=False)
    partial = load_tree(out)
    assert partial.attrs["status"] == "partial"
    done = partial["results"]["done"].values
    assert done.sum() == 1 and done[0, 0]
    first = partial["results"]["consistency_error"].values[0, 0].copy()
    assert np.all(np.isfinite(first))

    calls.clear()
    monkeypatch.setattr(
        studies, "_estimation_cell", lambda *a, **k: (calls.append(a[2:4]), real_cell(*a, **k))
    )
    with pytest.raises(studies.StudyExists, match="--resume"):
        studies.run_estimation(cfg, out, progress=False)
    other = studies.EstimationConfig(**(TINY_ESTIMATION | {"iterations": 41}))
    with pytest.raises(ValueError, match="different config"):
        studies.run_estimation(other, out, resume=True, progress=False)
    tree = studies.run_estimation(cfg, out, resume=True, progress=False)
    assert ("smooth", 0) not in calls and len(calls) == 3
    res = tree["results"].to_dataset()
    assert bool(res["done"].all()) and tree.attrs["status"] == "complete"
    np.testing.assert_array_equal(res["consistency_error"].values[0, 0], first)
    assert {"bootstrap", "posterior"} <= set(tree.children)
    assert "diagnostics" in tree["posterior"].children
    for name in ("consistency_error", "teacher_error", "kl_estimate", "energy_distance"):
        assert res[name].attrs["long_name"]
    assert res["step"].attrs["units"].startswith("OU time")
    assert json.loads(tree.attrs["config"])["iterations"] == 40
    assert {"versions", "seeds", "dtype", "device", "timestamp", "wall_time_s"} <= set(tree.attrs)
    # the teacher's error grows with Delta (discretization part)
    assert np.all(res["teacher_error_mean"].values[:, 1] > res["teacher_error_mean"].values[:, 0])


def test_sampling_study_and_cli(tmp_path, capsys):
    cfg_file = tmp_path / "s.toml"
    cfg_file.write_text(
        "[sampling]\ndims = [1, 2]\nmax_steps = 3\ntaus = [0.0, inf]\nbaseline_steps = [4, 8]\neps = [0.1]\nn_grid = 201\n"
    )
    out = tmp_path / "s.nc"
    assert (
        cli.main(["run", "sampling", "--config", str(cfg_file), "--out", str(out), "--no-progress"])
        == 0
    )
    tree = load_tree(out)
    res = tree["results"].to_dataset()
    assert res["kl"].dims == ("regime", "dim", "tau", "steps")
    assert np.all(np.isfinite(res["kl"].values))
    # box regime: KL_d = d KL_1 exactly; Gaussian: deterministic tau = 0 KL = KL(N(0, I) || p_T)
    np.testing.assert_allclose(
        res["kl"].sel(regime="nonsmooth", dim=2),
        2 * res["kl"].sel(regime="nonsmooth", dim=1),
        rtol=1e-12,
    )
    assert np.all(res["kl"].sel(tau=np.inf) <= res["kl"].sel(tau=0.0) + 1e-15)
    assert cli.main(["report", str(out)]) == 0
    text = capsys.readouterr().out
    assert "steps to reach KL <= eps^2" in text and (tmp_path / "s_kl_vs_steps.png").exists()
    assert cli.main(["info", str(out)]) == 0
    assert '"max_steps": 3' in capsys.readouterr().out
    assert cli.main(["run", "sampling", "--config", str(cfg_file), "--out", str(out)]) == 1
    assert "--resume" in capsys.readouterr().err


def test_config_validation(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[estimation]\nsteps = [0.1, 0.4]\nlerning_rate = 0.1\n")
    assert (
        cli.main(["run", "estimation", "--config", str(bad), "--out", str(tmp_path / "o.nc")]) == 2
    )
    err = capsys.readouterr().err
    assert "unknown config key(s) ['lerning_rate']" in err and "learning_rate" in err
    assert not (tmp_path / "o.nc").exists()
    with pytest.raises(ValueError, match="divide the largest step"):
        studies.EstimationConfig(steps=(0.15, 0.4))
    with pytest.raises(ValueError, match="`regimes` accepts"):
        studies.EstimationConfig(regimes=("rough",))
    with pytest.raises(ValueError, match="`iterations` must be an integer"):
        studies.EstimationConfig(iterations=0)
    with pytest.raises(ValueError, match="`baselines` accepts"):
        studies.SamplingConfig(baselines=("ode_rk4",))
    with pytest.raises(ValueError, match="not valid TOML"):
        bad.write_text("[estimation\n")
        studies.load_config(str(bad), "estimation")


def test_quick_main_job_end_to_end(tmp_path):
    """`mcm-prob run estimation --quick --out x.nc && mcm-prob report x.nc` as a user runs it."""
    exe = shutil.which("mcm-prob")
    cmd = [exe] if exe else [sys.executable, "-m", "mcm_prob.cli"]
    out = tmp_path / "x.nc"
    run = subprocess.run(
        cmd + ["run", "estimation", "--quick", "--out", str(out), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    rep = subprocess.run(cmd + ["report", str(out)], capture_output=True, text=True, timeout=120)
    assert rep.returncode == 0, rep.stderr[-2000:]
    for word in ("smooth", "nonsmooth", "bootstrap CI", "HDI", "r_hat", "ESS"):
        assert word in rep.stdout
    assert (tmp_path / "x_error_vs_step.png").exists()


def test_cli_interrupt_says_how_to_resume(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(studies, "run_sampling", interrupted)
    assert cli.main(["run", "sampling", "--quick", "--out", str(tmp_path / "i.nc")]) == 130
    assert "--resume" in capsys.readouterr().err
