"""JAX's multi-controller runtime on this machine: 2 processes on localhost, 2 CPU devices
each, Gloo collectives (`mcm_prob.devices.initialize_distributed`). The processes are started
by the tests with a free port."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
import pytest
import xarray as xr

from tests.test_training import sharding_case

ROOT = Path(__file__).resolve().parents[1]

_FIT = """
import pickle, sys, equinox as eqx, jax, numpy as np
jax.config.update("jax_enable_x64", True)
from mcm_prob.devices import initialize_distributed
index, count = initialize_distributed(f"localhost:{sys.argv[1]}", 2, int(sys.argv[2]))
assert (count, jax.device_count(), jax.local_device_count()) == (2, 4, 2), jax.devices()
from tests.test_distributed import spread_case
with open(sys.argv[3], "wb") as f:
    pickle.dump(spread_case(), f)
"""


def spread_case():
    """What a multi-controller run spreads over its processes: a fit_grid (6 models padded to
    8 devices), the draws of its samplers (`sample_grid`: 3 rows over 2 processes), two
    error models (one per process) and estimates by rows (`rows_over_processes`: 6 energy
    distances; 5 rows that record which process computed them). Returns numpy arrays and the
    fitted trees."""
    import mcm_prob as mp
    from mcm_prob.devices import rows_over_processes
    from mcm_prob.metrics import energy_distance
    from tests.test_statistics import synthetic

    grid, history = sharding_case()
    leaves = jax.tree_util.tree_leaves(eqx.filter(grid.models, eqx.is_array))
    draws = mp.sample_grid(grid, jax.random.split(jax.random.key(3), 2), 16, dim=2,
                           schedule=mp.Schedule.constant(delta=0.05, h=0.3, steps=2))  # fmt: skip
    errors = synthetic([2.0, 1.0], rng=np.random.default_rng(5))
    fits = mp.fit_error_models(errors, ("power_law", "two_term"), chains=2, warmup=50, draws=50)
    sets = np.asarray(draws).reshape(6, 16, 2)  # the estimators of a study, spread by rows
    energy = rows_over_processes(lambda i: energy_distance(sets[i], sets[(i + 1) % 6]), 6)
    rows = rows_over_processes(lambda i: (i, np.full(i.shape, jax.process_index())), 5)
    return {
        "loss": history["loss"],
        "failed_at": history["failed_at"],
        "weights": [np.asarray(a) for a in leaves],
        "draws": np.asarray(draws),
        "fits": fits,
        "energy": energy,
        "rows": rows,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_processes(code: str, args, tmp_path, n: int = 2, timeout: float = 300):
    """Start `n` processes of `code` (argv: port, process id, *args), 2 CPU devices each;
    returns their CompletedProcess-like (returncode, stdout, stderr) in process order."""
    port = free_port()
    env = os.environ | {
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(ROOT),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(port), str(i), *[a.format(i=i, port=port) for a in args]],
            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(n)
    ]  # fmt: skip
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        out.append((p.returncode, stdout, stderr))
    return out


@pytest.mark.heavy(120)
def test_fit_grid_samplers_and_error_models_over_two_processes_equal_one_process(tmp_path):
    """On the global mesh of 2 processes x 2 devices every process gets the single-process
    `fit_grid` models and losses (float64, rtol 1e-12), the same sampler draws (`sample_grid`
    split by rows), the same error-model fits (split by model, exchanged) and the same
    estimates computed by rows (`rows_over_processes`: process p computes rows p, p + 2, ...;
    5 rows, the second process's part padded)."""
    import pickle

    results = run_processes(_FIT, [str(tmp_path / "p{i}.pkl")], tmp_path)
    for code, _, err in results:
        assert code == 0, err[-3000:]
    want = spread_case()
    np.testing.assert_array_equal(want["rows"][0], np.arange(5))
    np.testing.assert_array_equal(want["rows"][1], np.zeros(5))  # one process: all rows
    for i in range(2):
        with open(tmp_path / f"p{i}.pkl", "rb") as f:
            got = pickle.load(f)
        np.testing.assert_array_equal(got["failed_at"], want["failed_at"])
        np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-12)
        for a, b in zip(got["weights"], want["weights"], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(got["draws"], want["draws"], rtol=1e-10, atol=1e-12)
        for a, b in zip(got["energy"], want["energy"], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12)
        np.testing.assert_array_equal(got["rows"][0], np.arange(5))
        np.testing.assert_array_equal(got["rows"][1], [0, 1, 0, 1, 0])
        for m, fit in want["fits"].items():
            for group in ("posterior", "log_likelihood", "checks"):
                xr.testing.assert_identical(got["fits"][m][group].to_dataset(),
                                            fit[group].to_dataset())  # fmt: skip


TINY_TOML = """[estimation]
budgets = [20, 40]
steps = [0.1, 0.2, 0.4]
seeds = [0, 1]
error_models = ["power_law"]
eval_samples = 64
sample_size = 64
n_boot = 100
chains = 2
warmup = 50
draws = 100
refits = 0
[estimation.train]
width = 8
batch_size = 32
[estimation.data.g1]
family = "gaussian"
mean = [0.5]
cov = [[0.6]]
"""


def _cli(*args):
    return [sys.executable, "-m", "mcm_prob.cli", "run", "estimation", *args, "--no-progress"]


@pytest.mark.heavy(160)
def test_a_study_over_two_processes_survives_a_lost_process_and_equals_one_process(tmp_path):
    """`mcm-prob run estimation --distributed` as 2 processes of 2 CPU devices: killing
    process 1 after the first saved cell ends process 0 at its next collective with one
    message (exit 1, no abort) and leaves the saved cell in the file (written by process 0
    only); the same command with --resume on both completes it, and the file's results equal
    an uninterrupted single process's on the same 4 devices (every variable of every group,
    timings aside); it records the process and device counts."""
    import signal
    import time

    from mcm_prob.results import load_tree

    cfg, out = tmp_path / "two.toml", tmp_path / "x.nc"
    second = '[estimation.data.g2]\nfamily = "gaussian"\nmean = [-0.5]\ncov = [[0.3]]\n'
    cfg.write_text(TINY_TOML + second)
    argv = ["--config", str(cfg), "--out", str(out), "--distributed", "--num-processes", "2"]
    env = os.environ | {"XLA_FLAGS": "--xla_force_host_platform_device_count=2",
                        "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}  # fmt: skip

    def start(port, resume=False):
        extra = ["--resume"] if resume else []
        return [
            subprocess.Popen(
                _cli(*argv, "--coordinator", f"localhost:{port}", "--process-id", str(i), *extra),
                env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            for i in range(2)
        ]  # fmt: skip

    procs = start(free_port())
    deadline = time.monotonic() + 240
    while not out.exists():
        assert time.monotonic() < deadline and procs[0].poll() is None, procs[0].communicate()
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    _, err = procs[0].communicate(timeout=240)
    procs[1].wait()
    assert procs[0].returncode == 1, err[-3000:]
    message = [line for line in err.splitlines() if line.startswith("mcm-prob:")]
    assert len(message) == 1 and "process 0 of 2: the run stopped" in message[0], err[-3000:]
    assert f"saved in {out}" in message[0] and "--resume" in message[0]
    partial = load_tree(out)
    cells = partial["results"]["done"].all("step")  # a cell: one (entry, method, size)
    assert partial.attrs["status"] == "partial" and int(cells.sum()) == 1
    procs = start(free_port(), resume=True)
    said = []
    for p in procs:
        stdout, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        said.append("wrote" in stdout)
    assert said == [True, False]  # process 0 writes, process 1 says nothing
    two = load_tree(out)
    assert two.attrs["status"] == "complete" and bool(two["results"]["done"].all())
    one = subprocess.run(
        _cli("--config", str(cfg), "--out", str(tmp_path / "one.nc")),
        env=env | {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    ref = load_tree(tmp_path / "one.nc")
    assert (two.attrs["process_count"], two.attrs["device_count"]) == (2, 4)
    assert (ref.attrs["process_count"], ref.attrs["device_count"]) == (1, 4)
    assert sorted(n.path for n in two.subtree) == sorted(n.path for n in ref.subtree)
    for node in ref.subtree:  # every result; the timings (wall time, s/iteration) aside
        want = node.to_dataset()
        timings = [v for v in want.data_vars if "wall_time" in v or "seconds" in v]
        xr.testing.assert_allclose(two[node.path].to_dataset().drop_vars(timings),
                                   want.drop_vars(timings))  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.nc", "two.toml", "x.nc"]


def test_initialize_distributed_checks_its_arguments_first():
    """Bad settings are refused by name before JAX is asked to join anything; a call after
    this process's first JAX computation is refused with what to do."""
    from mcm_prob.devices import initialize_distributed

    with pytest.raises(ValueError, match="`coordinator` must look like HOST:PORT"):
        initialize_distributed("localhost", 2, 0)
    with pytest.raises(ValueError, match="pass `coordinator`, `num_processes` and `process_id`"):
        initialize_distributed(None, 2, None)
    with pytest.raises(ValueError, match=r"`process_id` must be an integer in \[0, 2\)"):
        initialize_distributed("localhost:1234", 2, 2)
    jax.numpy.zeros(1).block_until_ready()
    with pytest.raises(RuntimeError, match="must run before the first JAX computation"):
        initialize_distributed("localhost:1234", 2, 0)
