"""Devices: one XLA CPU device per core for the `mcm-prob` command, and how files name them.

`fit_grid` shards its model axis over every local device (`jax.local_devices()`). On a GPU
machine these are the GPUs. On a CPU, XLA shows one device that splits single operations over
the cores, which the small matrices of a consistency net use poorly (a 40-model grid of the
main job trains 1.5x faster on 2 cores as 2 devices of 20 models than as 1 device of 40); the
command therefore asks XLA for one CPU device per core before JAX starts. In a notebook or
script, do the same before the first JAX computation:

    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"  # cores to use
    import jax

A device count already in ``XLA_FLAGS`` is left as it is (set it to 1 to opt out).
"""

from __future__ import annotations

import os

import jax

__all__ = ["use_every_cpu_core", "describe_devices", "cpu_cores"]

_FLAG = "--xla_force_host_platform_device_count"


def cpu_cores() -> int:
    """The CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def use_every_cpu_core() -> bool:
    """Ask XLA for one CPU device per available core (see the module docstring). Returns True
    when the flag was set; False when ``XLA_FLAGS`` already names a count, there is one core,
    or JAX's backends are already running (then the flag would have no effect)."""
    try:  # a private helper of JAX; without it assume the backends are not running yet
        from jax._src.xla_bridge import backends_are_initialized

        started = backends_are_initialized()
    except (ImportError, AttributeError):
        started = False
    flags = os.environ.get("XLA_FLAGS", "")
    n = cpu_cores()
    if _FLAG in flags or n < 2 or started:
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {_FLAG}={n}".strip()
    return True


def describe_devices() -> str:
    """The local devices as ``"N x KIND (platform)"``, e.g. ``"2 x cpu (cpu)"``, plus the
    process count when several processes share the run."""
    devices = jax.local_devices()
    text = f"{len(devices)} x {devices[0].device_kind} ({devices[0].platform})"
    if jax.process_count() > 1:
        text += f", process {jax.process_index()} of {jax.process_count()}"
    return text
