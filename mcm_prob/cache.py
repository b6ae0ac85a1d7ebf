"""JAX's persistent compilation cache, on by default for the studies.

A study compiles the same programs every time it runs (training grids, samplers, grid laws,
NUTS); JAX can keep the compiled executables on disk so a second run, or a resumed one, skips
compilation. `run_study` calls `enable_compilation_cache()` and records the directory in the
file's provenance (attribute ``compilation_cache``).

* A cache directory the user set (``jax.config.update("jax_compilation_cache_dir", ...)`` or
  the ``JAX_COMPILATION_CACHE_DIR`` environment variable) is used as it is.
* Otherwise ``$MCM_PROB_COMPILATION_CACHE`` or, by default, ``$XDG_CACHE_HOME/mcm_prob/jax``
  (``~/.cache/mcm_prob/jax``); every compilation is cached (minimum compile time 0 s).
* ``MCM_PROB_COMPILATION_CACHE=off`` leaves the cache off.

**Several processes, one cache.** JAX writes an entry with a plain write and reads it without
a lock unless the cache has a size limit, so a process could read an entry another one is
still writing (JAX then finds a bad zlib stream and recompiles). A cache this module turns on
gets a size limit (`MAX_SIZE`, least recently used entries evicted, unless
``jax_compilation_cache_max_size`` was set), under which JAX holds a file lock (`filelock`)
around every read and write.

**Known fault.** Twice in this project's test suite (two pytest workers and CLI subprocesses
sharing one cache, JAX 0.10.2 on a CPU), a process aborted ("Fatal Python error: Aborted")
inside XLA's `deserialize_executable` while loading a training program from the cache. The
same abort later hit a worker compiling with no cache at all, and was traced to the worker's
memory mappings: every CPU executable JAX keeps alive holds a few, and a process that has
compiled thousands of programs reaches Linux's `vm.max_map_count` (65,530 by default), after
which LLVM aborts on the next one (see ``tests/conftest.py``, which now releases JAX's
caches in long test workers). A long notebook session that compiles many distinct programs
can do the same: ``jax.clear_caches()`` frees them. The test suite still runs with the
persistent cache off (``tests/conftest.py``) except where the cache itself is tested.

**Traced programs.** The cache keeps compiled executables, but a program is still traced in
every new process before the cache is consulted; for NumPyro's vectorised NUTS that costs
seconds per error model. `lower_cached` keeps such a program's traced form too (a serialised
`jax.export.Exported`, in ``exported/`` inside the cache directory), keyed by a fingerprint of
what the program depends on, the argument shapes and the JAX version; a later process
deserialises it (milliseconds) instead of tracing. Same program, same results (tested).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import jax
from jax.experimental.compilation_cache.compilation_cache import reset_cache

from .results import write_atomic

__all__ = ["enable_compilation_cache", "compilation_cache_dir", "lower_cached"]

OFF = ("off", "0", "false", "no")
MAX_SIZE = 4 * 2**30  # bytes
MIN_FREE = 64 * 2**20  # bytes free on the cache's disk for it to be used
_CACHE_ERROR = re.compile(r"Error (reading|writing) persistent compilation cache entry")


def compilation_cache_dir() -> str | None:
    """The active cache directory, or None when the persistent cache is off."""
    return jax.config.jax_compilation_cache_dir or None


def enable_compilation_cache() -> str | None:
    """Turn the persistent compilation cache on (see the module docstring); returns the
    directory, or None when the user switched it off or it is not usable (not a directory,
    not writable, or less than `MIN_FREE` bytes free: one warning says so and the run goes on
    without a cache, which is then recorded as off)."""
    current = compilation_cache_dir()
    if current is None:
        choice = os.environ.get("MCM_PROB_COMPILATION_CACHE", "")
        if choice.strip().lower() in OFF:
            return None
        if choice:
            path = Path(choice).expanduser()
        else:
            base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
            path = Path(base) / "mcm_prob" / "jax"
    else:
        path = Path(current)
    problem = _unusable(path)
    if problem:
        warnings.warn(
            f"the compilation cache {path} is not usable ({problem}); running without it (set "
            "MCM_PROB_COMPILATION_CACHE to a writable directory, or to 'off' to silence this)",
            stacklevel=2,
        )
        jax.config.update("jax_compilation_cache_dir", None)
        reset_cache()
        return None
    if current is not None:
        return current
    if jax.config.jax_compilation_cache_max_size == -1:  # unlimited: JAX would not lock
        jax.config.update("jax_compilation_cache_max_size", MAX_SIZE)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return str(path)


def _unusable(path: Path) -> str:
    """Why `path` cannot hold the cache ("" when it can): created if missing, then written
    to (a probe file) and its free space measured."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe"):
            pass
        free = shutil.disk_usage(path).free
    except FileExistsError:
        return "it is a file, not a directory"
    except OSError as err:
        return f"{err.strerror or err}"
    if free < MIN_FREE:
        return f"{free / 2**20:.0f} MiB free on its disk, less than {MIN_FREE // 2**20} MiB"
    return ""


@contextlib.contextmanager
def cache_warnings_once():
    """Within: JAX's warnings about cache entries it cannot read or write (a disk that fills
    up during a run, a directory made read-only) are shown once, not once per program."""
    show, shown = warnings.showwarning, []

    def once(message, category, *args, **kwargs):
        text = str(message)
        if _CACHE_ERROR.match(text):
            if shown:
                return
            shown.append(text)
            message = f"{text} (further compilation-cache errors of this run are not shown)"
        show(message, category, *args, **kwargs)

    with warnings.catch_warnings():
        warnings.showwarning = once
        yield


def lower_cached(fn, args: tuple, *, name: str, fingerprint: str) -> jax.stages.Lowered:
    """``fn.lower(*args)`` for a jitted `fn`, its traced form kept in the cache directory
    (module docstring); without a cache, or when the stored form cannot be read, `fn` is
    traced as usual. `fingerprint` must change whenever the program would (the source and
    library versions it is built from): a stale fingerprint runs a stale program."""
    directory = compilation_cache_dir()
    if directory is None:
        return fn.lower(*args)
    leaves = jax.tree_util.tree_leaves(args)
    shapes = [(a.shape, str(a.dtype)) for a in leaves]
    # the platform the arguments live on, not the default backend: on a GPU host the NUTS
    # programs run on a CPU device and must be exported for it
    platforms = tuple(sorted({_platform(d) for a in leaves for d in _devices(a)})) or (
        jax.export.default_export_platform(),
    )
    key = f"{fingerprint}|{shapes}|{platforms}|jax {jax.__version__}"
    digest = hashlib.sha256(key.encode()).hexdigest()
    path = Path(directory) / "exported" / f"{name}-{digest[:32]}.jaxexport"
    try:
        exported = jax.export.deserialize(bytearray(path.read_bytes()))
    except Exception:  # absent, unreadable or from another format: trace and store
        exported = jax.export.export(fn, platforms=platforms)(*args)
        try:
            write_atomic(path, exported.serialize())  # readers see old or whole new
        except OSError:  # a read-only or full cache: the program runs, it is not kept
            pass
    return jax.jit(exported.call).lower(*args)


def _devices(leaf) -> set:
    """The devices a committed array lives on (none for numpy arrays and scalars)."""
    return leaf.devices() if isinstance(leaf, jax.Array) else set()


def _platform(device) -> str:
    """A device's platform as `jax.export` names it (``cuda``/``rocm``, not ``gpu``)."""
    if device.platform != "gpu":
        return device.platform
    return "rocm" if "rocm" in device.client.platform_version.lower() else "cuda"
