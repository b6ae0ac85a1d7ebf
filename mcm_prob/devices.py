"""Devices: one XLA CPU device per core and reproducible GPU kernels for the `mcm-prob`
command, and how files name them.

`fit_grid` shards its model axis over every device (`jax.devices()`; with one process the
local ones). On a GPU machine these are the GPUs. On a CPU, XLA shows one device that splits single operations over
the cores, which the small matrices of a consistency net use poorly (a 40-model grid of the
main job trains 1.5x faster on 2 cores as 2 devices of 20 models than as 1 device of 40); the
command therefore asks XLA for one CPU device per core before JAX starts. In a notebook or
script, do the same before the first JAX computation:

    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"  # cores to use
    import jax

A device count already in ``XLA_FLAGS`` is left as it is (set it to 1 to opt out).

**Reproducible GPU runs.** XLA picks some GPU kernels (matrix products) by timing the
candidates while it compiles, so the same program compiled twice can add in another order:
on one H100, two cold runs of the default main job (each with its own empty compilation
cache) differed in 163 and 167 result variables (even float64 ones by 1e-13 relative, the
trained models by more: 6000 iterations amplify round-off), while three cold runs with
``--xla_gpu_autotune_level=0`` (kernels chosen by fixed rules, not timed) were identical and
no slower (99-115 s cold, 42 s warm, against 106-118 s and 43 s). The command asks for it
(`reproducible_gpu_kernels`); an autotune level already in ``XLA_FLAGS`` is left as it is.

**Several processes** (JAX's multi-controller runtime, docs/scaling.md): every process runs
the same program after `initialize_distributed()`, which calls `jax.distributed.initialize`
with what the cluster provides (SLURM, Open MPI) or an explicit coordinator; `fit_grid` then
shards its models over `jax.devices()`, every device of every process, and a study is written
by process 0 only.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from ._checks import integer

__all__ = [
    "use_every_cpu_core",
    "reproducible_gpu_kernels",
    "describe_devices",
    "cpu_cores",
    "initialize_distributed",
    "is_writer",
    "rows_over_processes",
]

_FLAG = "--xla_force_host_platform_device_count"
_AUTOTUNE = "--xla_gpu_autotune_level"


def cpu_cores() -> int:
    """The CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def use_every_cpu_core() -> bool:
    """Ask XLA for one CPU device per available core (see the module docstring). Returns True
    when the flag was set; False when ``XLA_FLAGS`` already names a count, there is one core,
    or JAX's backends are already running (then the flag would have no effect)."""
    started = _backends_started()
    flags = os.environ.get("XLA_FLAGS", "")
    n = cpu_cores()
    if _FLAG in flags or n < 2 or started:
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {_FLAG}={n}".strip()
    return True


def reproducible_gpu_kernels() -> bool:
    """Ask XLA to choose GPU kernels by fixed rules, not by timing them while compiling
    (``--xla_gpu_autotune_level=0``; the module docstring), so that a GPU run compiled afresh
    gives the same numbers bit for bit. Returns True when the flag was set; False when
    ``XLA_FLAGS`` already names an autotune level or JAX's backends are already running. No
    effect on CPUs."""
    flags = os.environ.get("XLA_FLAGS", "")
    if _AUTOTUNE in flags or _backends_started():
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {_AUTOTUNE}=0".strip()
    return True


def initialize_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    heartbeat_timeout_seconds: int = 100,
) -> tuple[int, int]:
    """Join a multi-controller run (`jax.distributed.initialize`) before any JAX computation;
    returns (this process's index, the process count).

    `coordinator` ``"HOST:PORT"`` (process 0's address), `num_processes` and `process_id`:
    all three, or none to let JAX read them from the cluster (SLURM, Open MPI). On CPUs the
    processes exchange data through Gloo (set here). A process that stops answering for
    `heartbeat_timeout_seconds` ends the others' runs."""
    given = [v is not None for v in (coordinator, num_processes, process_id)]
    if any(given) and not all(given):
        raise ValueError(
            "pass `coordinator`, `num_processes` and `process_id` together (or none of them, "
            "to take them from SLURM or Open MPI)"
        )
    if all(given):
        if not isinstance(coordinator, str) or not coordinator.rpartition(":")[2].isdigit():
            raise ValueError(f"`coordinator` must look like HOST:PORT, got {coordinator!r}")
        num_processes = integer("num_processes", num_processes)
        process_id = integer("process_id", process_id, ge=0, lt=num_processes)
    if _backends_started():
        raise RuntimeError(
            "initialize_distributed() must run before the first JAX computation of this "
            "process (call it at the top of the script or notebook)"
        )
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator,
        num_processes,
        process_id,
        heartbeat_timeout_seconds=integer("heartbeat_timeout_seconds", heartbeat_timeout_seconds),
    )
    return jax.process_index(), jax.process_count()


def is_writer() -> bool:
    """Whether this process writes the results (process 0; the only process when alone)."""
    return jax.process_index() == 0


def rows_over_processes(fn, rows: int):
    """``fn(np.arange(rows))``, computed in parts in a multi-controller run: process p of n
    computes the rows p, p + n, ... (as many on every process, a part short of rows repeating
    its last one) and every process gets every row, gathered in order. One process computes
    them all in one call.

    `fn` maps an integer index array (k,) to a pytree of arrays of leading axis k (numpy or
    JAX; returned as numpy in a multi-controller run), and must give row i the same value
    whichever other rows it is called with: then the result is the single-process one."""
    index, count = jax.process_index(), jax.process_count()
    if count == 1:
        return fn(np.arange(rows))
    per = -(-rows // count)  # rows per process
    mine = np.arange(index, rows, count)
    mine = np.concatenate([mine, np.full(per - mine.size, mine[-1] if mine.size else 0)])
    every = multihost_utils.process_allgather(jax.tree_util.tree_map(np.asarray, fn(mine)))

    def in_order(a):  # (count, per, ...) -> (rows, ...); process p computed rows p, p + count, ...
        out = np.empty((rows, *a.shape[2:]), a.dtype)
        for p in range(count):
            out[p::count] = a[p, : len(range(p, rows, count))]
        return out

    return jax.tree_util.tree_map(lambda a: in_order(np.asarray(a)), every)


def _backends_started() -> bool:
    try:  # a private helper of JAX; without it assume the backends are not running yet
        from jax._src.xla_bridge import backends_are_initialized

        return backends_are_initialized()
    except (ImportError, AttributeError):
        return False


def describe_devices() -> str:
    """The local devices as ``"N x KIND (platform)"``, e.g. ``"2 x cpu (cpu)"``, plus the
    process count when several processes share the run."""
    devices = jax.local_devices()
    text = f"{len(devices)} x {devices[0].device_kind} ({devices[0].platform})"
    if jax.process_count() > 1:
        text += f", process {jax.process_index()} of {jax.process_count()}"
    return text
