"""One XLA CPU device per core and reproducible GPU kernels for the command line
(`mcm_prob.devices`)."""

import os
import subprocess
import sys

_CHECK = """
import os, jax
from mcm_prob.devices import describe_devices, use_every_cpu_core
cores = len(os.sched_getaffinity(0))
set_now = use_every_cpu_core()
print(set_now, cores, jax.local_device_count(), describe_devices(), use_every_cpu_core())
"""


def _run(env, script=_CHECK):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | env
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    return out.stdout.split()


def test_one_cpu_device_per_core_unless_the_user_chose():
    set_now, cores, n, *desc, again = _run({"JAX_PLATFORMS": "cpu"})
    cores, n = int(cores), int(n)
    assert set_now == str(cores > 1) and n == cores and again == "False"
    assert " ".join(desc) == f"{cores} x cpu (cpu)"
    # a device count already in XLA_FLAGS wins
    flags = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=3"}
    set_now, _, n, *_ = _run(flags)
    assert set_now == "False" and n == "3"


_AUTOTUNE_CHECK = """
import os
from mcm_prob.devices import reproducible_gpu_kernels
first = reproducible_gpu_kernels()
flags = os.environ.get("XLA_FLAGS", "")
import jax
jax.numpy.zeros(1).block_until_ready()  # XLA parsed the flags; the backends are running
print(first, reproducible_gpu_kernels(), ",".join(flags.split()))
"""


def test_gpu_kernels_chosen_by_fixed_rules_unless_the_user_chose():
    """`reproducible_gpu_kernels` adds --xla_gpu_autotune_level=0 to XLA_FLAGS (keeping what
    is there, accepted by a CPU-only XLA too), leaves a level the user set, and does nothing
    once JAX's backends run."""
    count = "--xla_force_host_platform_device_count=2"
    first, again, flags = _run({"JAX_PLATFORMS": "cpu", "XLA_FLAGS": count}, _AUTOTUNE_CHECK)
    assert (first, again, flags) == ("True", "False", f"{count},--xla_gpu_autotune_level=0")
    user = "--xla_gpu_autotune_level=4"
    first, again, flags = _run({"JAX_PLATFORMS": "cpu", "XLA_FLAGS": user}, _AUTOTUNE_CHECK)
    assert (first, again, flags) == ("False", "False", user)
