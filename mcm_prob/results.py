"""Results I/O: provenance attributes and atomic netCDF-4 files holding an `xarray.DataTree`.

Files are serialised with h5netcdf in memory, written to a temporary file in the target folder
(created with the user's umask, flushed to disk) and renamed over the target (`os.replace`), so
a reader never sees a half-written file and an interrupted or failed write (disk full,
read-only folder) leaves the previous version intact; the failure is a `ResultsWriteError`
naming the path. A temporary file orphaned by a killed process (``NAME.*.tmp``) is removed by
`remove_stale_temps`, which the study driver calls when it opens a file. They open with `xarray.open_datatree` and netCDF4-python.
Attribute values are kept to netCDF-safe types (str, int, float, numpy arrays); anything else
(dicts, lists of strings, booleans, None) is stored as JSON text. Boolean variables use
xarray's encoding (int8 with ``dtype: bool``), so plain `xarray.open_datatree` gives booleans.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import glob
import json
import os
import platform
import secrets
from importlib import metadata
from pathlib import Path

import numpy as np
import xarray as xr

__all__ = [
    "provenance",
    "save_tree",
    "load_tree",
    "remove_stale_temps",
    "write_atomic",
    "ResultsWriteError",
    "PACKAGES",
]

PACKAGES = (
    "mcm_prob",
    "jax",
    "jaxlib",
    "numpyro",
    "equinox",
    "optax",
    "diffrax",
    "xarray",
    "numpy",
    "scipy",
    "h5netcdf",
    "arviz-base",
    "arviz-stats",
)


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def provenance(*, config_json: str, seeds, dtype: str, wall_time: float, study: str) -> dict:
    """Global provenance attributes: versions, config, seeds, dtype, device, timestamp, wall time."""
    import jax

    from .devices import describe_devices

    return {
        "study": study,
        "config": config_json,
        "seeds": json.dumps([int(s) for s in seeds]),
        "dtype": dtype,
        "device": str(jax.devices()[0]),
        "devices": describe_devices(),
        "process_count": int(jax.process_count()),
        "device_count": int(jax.device_count()),
        "jax_x64": int(bool(jax.config.jax_enable_x64)),
        "compilation_cache": jax.config.jax_compilation_cache_dir or "off",
        # XLA's options, e.g. whether GPU kernels were chosen by timing (mcm_prob.devices)
        "xla_flags": os.environ.get("XLA_FLAGS") or "none",
        "python": platform.python_version(),
        "versions": json.dumps({name: _version(name) for name in PACKAGES}),
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "wall_time_s": float(wall_time),
    }


def _safe_attrs(attrs: dict) -> dict:
    out = {}
    for key, value in attrs.items():
        if isinstance(value, (bool, np.bool_)) or value is None:
            out[key] = json.dumps(None if value is None else bool(value))
        elif isinstance(value, (str, int, float, np.integer, np.floating)):
            out[key] = value
        elif isinstance(value, np.ndarray) and value.dtype.kind in "iuf":
            out[key] = value
        else:
            out[key] = json.dumps(value)
    return out


def _clean(tree: xr.DataTree) -> xr.DataTree:
    def fix(ds: xr.Dataset) -> xr.Dataset:
        ds = ds.copy()
        ds.attrs = _safe_attrs(ds.attrs)
        for name in ds.variables:
            ds[name].attrs = _safe_attrs(ds[name].attrs)
        return ds

    return tree.map_over_datasets(fix)


class ResultsWriteError(OSError):
    """A results file could not be written (the earlier version, if any, is intact)."""


def _temp_name(path: Path) -> Path:
    return path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that killed writers of `path` left behind; returns them."""
    path = Path(path)
    stale = [p for p in path.parent.glob(f"{glob.escape(path.name)}.*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def save_tree(tree: xr.DataTree | xr.Dataset, path: str | os.PathLike) -> Path:
    """Write `tree` atomically as a netCDF-4 file (h5netcdf engine); returns the path.

    Raises `ResultsWriteError` (an `OSError`) naming `path` when the file cannot be written;
    an existing file at `path` is then unchanged.
    """
    path = Path(path)
    if isinstance(tree, xr.Dataset):
        tree = xr.DataTree(tree)
    write_atomic(path, _clean(tree).to_netcdf(engine="h5netcdf", invalid_netcdf=False))
    return path


def write_atomic(path: str | os.PathLike, payload: bytes | memoryview) -> Path:
    """Write `payload` to `path` atomically: a temporary file beside it (created with the
    user's umask, flushed to disk), then `os.replace`. Raises `ResultsWriteError` naming `path`
    on any I/O error, leaving an existing file unchanged and no temporary file behind."""
    path = Path(path)
    tmp = _temp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise ResultsWriteError(f"could not write {path}: {err.strerror or err}") from err
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path


def load_tree(path: str | os.PathLike) -> xr.DataTree:
    """Read a file written by `save_tree` fully into memory (the file is closed afterwards);
    booleans come back as booleans (also from files of versions that marked them with a
    ``boolean`` attribute)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such results file: {path}")
    if not path.is_file():  # a directory, a FIFO (reading it would wait forever), a device
        raise ValueError(f"{path} is not a regular file")
    with xr.open_datatree(path, engine="h5netcdf") as tree:
        tree = tree.load()

    def fix(ds: xr.Dataset) -> xr.Dataset:
        ds = ds.copy()
        for name in list(ds.variables):
            if ds[name].attrs.get("boolean") == 1:
                var = ds[name].astype(bool)
                var.attrs = {k: v for k, v in ds[name].attrs.items() if k != "boolean"}
                ds[name] = var
        return ds

    return tree.map_over_datasets(fix)
