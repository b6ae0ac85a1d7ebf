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
inside XLA's `deserialize_executable` while loading a training program from the cache, with
the lock in place as well as without it; it was not reproduced alone. The test suite runs
with the cache off (``tests/conftest.py``) except where the cache itself is tested; if a run
aborts in `compilation_cache.get_executable_and_time`, set
``MCM_PROB_COMPILATION_CACHE=off`` (or delete the cache directory) and rerun with
``--resume``.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

__all__ = ["enable_compilation_cache", "compilation_cache_dir"]

OFF = ("off", "0", "false", "no")
MAX_SIZE = 4 * 2**30  # bytes


def compilation_cache_dir() -> str | None:
    """The active cache directory, or None when the persistent cache is off."""
    return jax.config.jax_compilation_cache_dir or None


def enable_compilation_cache() -> str | None:
    """Turn the persistent compilation cache on (see the module docstring); returns the
    directory, or None when the user switched it off."""
    current = compilation_cache_dir()
    if current is not None:
        return current
    choice = os.environ.get("MCM_PROB_COMPILATION_CACHE", "")
    if choice.strip().lower() in OFF:
        return None
    if choice:
        path = Path(choice).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        path = Path(base) / "mcm_prob" / "jax"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(
            f"cannot create the compilation cache directory {path} ({err}); set "
            "MCM_PROB_COMPILATION_CACHE to a writable directory or to 'off'"
        ) from err
    if jax.config.jax_compilation_cache_max_size == -1:  # unlimited: JAX would not lock
        jax.config.update("jax_compilation_cache_max_size", MAX_SIZE)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return str(path)
