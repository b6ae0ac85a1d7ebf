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
import sys, equinox as eqx, jax, numpy as np
jax.config.update("jax_enable_x64", True)
from mcm_prob.devices import initialize_distributed
index, count = initialize_distributed(f"localhost:{sys.argv[1]}", 2, int(sys.argv[2]))
assert (count, jax.device_count(), jax.local_device_count()) == (2, 4, 2), jax.devices()
from tests.test_training import sharding_case
grid, history = sharding_case()
leaves = jax.tree_util.tree_leaves(eqx.filter(grid.models, eqx.is_array))
np.savez(sys.argv[3], loss=history["loss"], failed_at=history["failed_at"],
         **{f"w{i}": np.asarray(a) for i, a in enumerate(leaves)})
"""


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


@pytest.mark.heavy(30)
def test_fit_grid_over_two_processes_equals_one_process(tmp_path):
    """`fit_grid` on the global mesh of 2 processes x 2 devices (6 models padded to 8) gives
    every process the single-process models and losses (float64, up to round-off)."""
    results = run_processes(_FIT, [str(tmp_path / "p{i}.npz")], tmp_path)
    for code, _, err in results:
        assert code == 0, err[-3000:]
    grid, history = sharding_case()
    want = jax.tree_util.tree_leaves(eqx.filter(grid.models, eqx.is_array))
    for i in range(2):
        got = np.load(tmp_path / f"p{i}.npz")
        np.testing.assert_array_equal(got["failed_at"], history["failed_at"])
        np.testing.assert_allclose(got["loss"], history["loss"], rtol=1e-12)
        for k, a in enumerate(want):
            np.testing.assert_allclose(got[f"w{k}"], np.asarray(a), rtol=1e-12, atol=1e-14)


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


@pytest.mark.heavy(90)
def test_estimation_study_over_two_processes_equals_one_process(tmp_path):
    """`mcm-prob run estimation --distributed` as 2 processes of 2 CPU devices writes one
    file (process 0; process 1 writes nothing) whose results equal a single process's on the
    same 4 devices (the error models split between the processes and exchanged), and which
    records the process and device counts."""
    from mcm_prob.results import load_tree

    cfg = tmp_path / "tiny.toml"  # two error models: one fitted by each process
    cfg.write_text(TINY_TOML.replace('["power_law"]', '["power_law", "two_term"]'))
    code = "import sys; from mcm_prob.cli import main; sys.exit(main(sys.argv[3:]))"
    results = run_processes(
        code,
        ["run", "estimation", "--config", str(cfg), "--out", str(tmp_path / "two.nc"),
         "--no-progress", "--distributed", "--coordinator", "localhost:{port}",
         "--num-processes", "2", "--process-id", "{i}"],
        tmp_path,
    )  # fmt: skip
    for code_, _, err in results:
        assert code_ == 0, err[-3000:]
    assert "wrote" in results[0][1] and "wrote" not in results[1][1]
    env = os.environ | {"XLA_FLAGS": "--xla_force_host_platform_device_count=4",
                        "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}  # fmt: skip
    one = subprocess.run(
        _cli("--config", str(cfg), "--out", str(tmp_path / "one.nc")),
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    two, ref = load_tree(tmp_path / "two.nc"), load_tree(tmp_path / "one.nc")
    assert (two.attrs["process_count"], two.attrs["device_count"]) == (2, 4)
    assert (ref.attrs["process_count"], ref.attrs["device_count"]) == (1, 4)
    assert sorted(n.path for n in two.subtree) == sorted(n.path for n in ref.subtree)
    for node in ref.subtree:  # every result; the timings (wall time, s/iteration) aside
        want = node.to_dataset()
        timings = [v for v in want.data_vars if "wall_time" in v or "seconds" in v]
        xr.testing.assert_allclose(two[node.path].to_dataset().drop_vars(timings),
                                   want.drop_vars(timings))  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.nc", "tiny.toml", "two.nc"]


@pytest.mark.heavy(90)
def test_a_lost_process_ends_the_run_and_resume_completes_it(tmp_path):
    """Killing process 1 after the first saved cell ends process 0 at its next collective
    with one message (exit 1, no abort), leaves the saved cell in the file, and the same
    command with --resume on both processes completes it."""
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
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    done = load_tree(out)
    assert done.attrs["status"] == "complete" and bool(done["results"]["done"].all())
