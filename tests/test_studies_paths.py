"""Studies on other paths: `path = "vp"` and `path = "ve"` from TOML through the CLI; the file
records the path and its time units, the report names it, a resume with another path is
refused, and the numbers are the path's exact laws."""

import json

import numpy as np
import pytest

import mcm_prob as mp
from mcm_prob import cli, paths
from mcm_prob.results import load_tree

ESTIMATION = (
    "[estimation]\n{path}\nsteps = [{s1}, {s2}, {s3}]\nseeds = [0, 1]\neval_samples = 64\n"
    "sample_size = 64\nn_boot = 100\nchains = 2\nwarmup = 50\ndraws = 100\nrefits = 0\nbudgets = [30]\n"
    'error_models = ["power_law"]\n[estimation.train]\nwidth = 8\nbatch_size = 32\n'
    '[estimation.data.g1]\nfamily = "gaussian"\nmean = [0.5]\ncov = [[0.5]]\n'
)
SAMPLING = (
    "[sampling]\n{path}\nmax_steps = 3\nh = {h}\nT = {T}\ntaus = [0.0, inf]\n"
    'baselines = ["sde_exponential", "ode_heun"]\nbaseline_steps = [4, 8]\neps = [0.1]\n'
    'n_grid = 201\n[sampling.data.g2]\nfamily = "gaussian"\nmean = [0.5, 0.0]\n'
    "cov = [[0.5, 0.2], [0.2, 2.0]]\n"
    '[sampling.data.box1]\nfamily = "uniform_box"\nlow = [-1.0]\nhigh = [1.0]\n'
)


@pytest.mark.heavy(70)
@pytest.mark.parametrize(
    "name,table,steps",
    [("vp", False, (0.025, 0.05, 0.1)), ("ve", True, (0.1, 0.2, 0.4))],
)
def test_estimation_on_a_path_from_toml(tmp_path, capsys, undescribed, name, table, steps):
    """The path as a key (vp) or a table (ve); every time coordinate carries its units."""

    def config(path_name):
        key = "" if table else f'path = "{path_name}"'
        text = ESTIMATION.format(path=key, s1=steps[0], s2=steps[1], s3=steps[2])
        return text + (f'[estimation.path]\npath = "{path_name}"\n' if table else "")

    toml = tmp_path / "e.toml"
    toml.write_text(config(name))
    out = tmp_path / "e.nc"
    argv = ["run", "estimation", "--config", str(toml), "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    tree = load_tree(out)
    assert undescribed(tree) == []
    path = paths.from_spec(name)
    assert json.loads(tree.attrs["config"])["path"] == path.to_spec()
    res = tree["results"].to_dataset()
    assert res["step"].attrs["units"] == path.units == res["t"].attrs["units"]
    assert np.all(np.isfinite(res["consistency_error_mean"].values))
    capsys.readouterr()
    assert cli.main(["report", str(out)]) == 0
    text = capsys.readouterr().out
    assert "\npath: " in text and f'"path": "{name}"' in text and path.units in text
    toml.write_text(config("ou"))  # a resume with another path is refused
    assert cli.main(argv[:-1] + ["--resume", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "different config" in err and "path.path" in err


@pytest.mark.heavy(20)
@pytest.mark.parametrize("name,h,T", [("vp", 0.3, 1.0), ("ve", 2.0, 20.0)])
def test_sampling_on_a_path_from_toml(tmp_path, capsys, name, h, T):
    """The stored KLs are the path's exact laws (Gaussian: sampler_law and baseline_law with
    path=; box: the grid law in OU coordinates)."""
    toml = tmp_path / "s.toml"
    toml.write_text(SAMPLING.format(path=f'path = "{name}"', h=h, T=T))
    out = tmp_path / "s.nc"
    argv = ["run", "sampling", "--config", str(toml), "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    res = load_tree(out)["results"].to_dataset()
    path = paths.from_spec(name)
    data = mp.data.Gaussian([0.5, 0.0], [[0.5, 0.2], [0.2, 2.0]])
    target = data.marginal(0.01, path)
    law = mp.sampler_law(data, delta=0.01, h=h, steps=2, path=path)
    np.testing.assert_allclose(
        res["kl"].sel(entry="g2", tau=0.0, steps=2), mp.metrics.kl_gaussian(law, target), rtol=1e-10
    )
    base = mp.diffusion.baseline_law(data, "ode_heun", T=T, delta=0.01, steps=8, path=path)
    np.testing.assert_allclose(
        res["kl_baseline"].sel(entry="g2", baseline="ode_heun", baseline_steps=8),
        mp.metrics.kl_gaussian(base, target),
        rtol=1e-10,
    )
    box = mp.data.UniformBox([-1.0], [1.0])
    grid = mp.gridlaw.grid_law_1d(box, delta=0.05, h=h, steps=3, path=path, n_grid=201)
    np.testing.assert_allclose(res["kl"].sel(entry="box1", tau=0.0, steps=3), grid.kl, rtol=1e-6)
    assert res["tau"].attrs["units"] == path.units
    capsys.readouterr()
    assert cli.main(["report", str(out)]) == 0
    assert f'"path": "{name}"' in capsys.readouterr().out
    toml.write_text(SAMPLING.format(path='path = "ou"', h=h, T=T))  # another path: refused
    assert cli.main(argv[:-1] + ["--resume", "--no-progress"]) == 1
    assert "different config" in capsys.readouterr().err


def test_study_path_refusals():
    with pytest.raises(ValueError, match="beyond the vp path's time range"):
        mp.studies.SamplingConfig(path="vp", h=0.5, T=1.0)
    with pytest.raises(ValueError, match="singular at T = 1"):
        mp.studies.SamplingConfig(path="linear", h=0.05, T=1.0)
    with pytest.raises(ValueError, match="config key `path`"):
        mp.studies.SamplingConfig(path="edm")
    with pytest.raises(ValueError, match="OU path only"):
        mp.studies.SchedulesConfig(path="vp")
    with pytest.raises(ValueError, match=r"T = delta \+ 8 x the largest step = 3.21"):
        mp.studies.EstimationConfig(path="linear", steps=(0.1, 0.2, 0.4))
    with pytest.raises(ValueError, match=r"\['path'\] are set by the study"):
        mp.studies.EstimationConfig(train={"path": "vp"})
