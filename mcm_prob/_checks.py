"""Argument validation shared by every stage.

Checks run on concrete (non-traced) values only, so that public functions raise a clear
`ValueError`/`TypeError` before any heavy work starts, and stay usable under `jax.jit`
(where arguments are tracers and the caller is responsible for their ranges).
"""

from __future__ import annotations

import math
import os

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


def concrete(value, name: str = "value") -> np.ndarray | None:
    """Return `value` as a float64 numpy array, or None if it is a JAX tracer; complex values
    are refused (casting would drop the imaginary part)."""
    if isinstance(value, jax.core.Tracer):
        return None
    if np.iscomplexobj(value):
        raise TypeError(f"`{name}` must be real, got a complex {type(value).__name__}")
    try:
        return np.asarray(value, dtype=np.float64)
    except jax.errors.TracerArrayConversionError:  # pragma: no cover - defensive
        return None
    except (TypeError, ValueError) as err:
        raise TypeError(f"expected a real number or array, got {type(value).__name__}") from err


def real_array(name: str, value, *, ndim: int | None = None) -> np.ndarray:
    """Validate a concrete, finite, real array argument and return it as float64 numpy."""
    try:
        complex_ = np.iscomplexobj(value)
        arr = None if complex_ else np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        if "inhomogeneous" in str(err):
            raise ValueError(
                f"`{name}` must be a rectangular array of numbers; its rows have different "
                f"lengths: {_short(value)}"
            ) from None
        raise TypeError(f"`{name}` must be a real array, got {type(value).__name__}") from err
    if complex_:
        raise TypeError(f"`{name}` must be real, got a complex array")
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"`{name}` must have {ndim} dimension(s), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"`{name}` must be finite (no NaN or inf)")
    return arr


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_time(name: str, t, *, positive: bool = False) -> None:
    """Check a concrete time: finite and t >= 0 (t > 0 if `positive`). Tracers pass."""
    arr = concrete(t, name)
    if arr is None:
        return
    if arr.ndim != 0:
        raise ValueError(f"`{name}` must be a scalar time, got shape {arr.shape}")
    if not np.isfinite(arr):
        raise ValueError(f"`{name}` must be finite, got {float(arr)}")
    if positive and not arr > 0:
        raise ValueError(f"`{name}` must be > 0, got {float(arr)}")
    if arr < 0:
        raise ValueError(f"`{name}` must be >= 0, got {float(arr)}")
    tiny = float(np.finfo(jax.numpy.result_type(float)).tiny)
    if 0 < arr < tiny:
        raise ValueError(
            f"`{name}`={float(arr):g} rounds to 0 in {jax.numpy.result_type(float)}: use 0 or a "
            f'time >= {tiny:.3g} (or enable float64 with jax.config.update("jax_enable_x64", True))'
        )


def check_times(t, s, *, s_positive: bool = False) -> None:
    """Check 0 <= s <= t (0 < s if `s_positive`) on concrete values."""
    check_time("t", t)
    check_time("s", s, positive=s_positive)
    ta, sa = concrete(t), concrete(s)
    if ta is not None and sa is not None and sa > ta:
        raise ValueError(f"`s` must be <= `t` (0 <= s <= t), got s={float(sa)} > t={float(ta)}")


def check_points(name: str, x, dim: int) -> None:
    """Check that the trailing axis of `x` has size `dim` and its values are finite."""
    shape = np.shape(x)
    if len(shape) == 0 or shape[-1] != dim:
        raise ValueError(
            f"`{name}` must have trailing dimension {dim} (the data dim), got shape {shape}"
        )
    arr = concrete(x, name)
    if arr is not None and not np.all(np.isfinite(arr)):
        raise ValueError(f"`{name}` must be finite (no NaN or inf)")


MEMORY_LIMIT_ENV = "MCM_PROB_MEMORY_LIMIT"  # bytes, or with a K, M, G or T suffix
MAX_ENTRIES_ENV = "MCM_PROB_MAX_ENTRIES"
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def memory_limit() -> int:
    """The resource guard's limit in bytes: ``MCM_PROB_MEMORY_LIMIT`` if set (the escape hatch
    for users who know better, e.g. ``64G``), else half of this machine's physical memory."""
    text = os.environ.get(MEMORY_LIMIT_ENV, "").strip().upper().removesuffix("B")
    if text:
        try:
            return int(float(text[:-1] if text[-1:] in _UNITS else text) * _UNITS.get(text[-1], 1))
        except ValueError:
            raise ValueError(
                f"{MEMORY_LIMIT_ENV} must be a number of bytes, optionally with K, M, G or T "
                f"(e.g. 64G), got {os.environ[MEMORY_LIMIT_ENV]!r}"
            ) from None
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return 8 * 2**30


def check_size(name: str, nbytes: float, what: str) -> None:
    """The resource guard: refuse, before any allocation, arguments that would make one
    computation hold more than `memory_limit()` bytes; `nbytes` is the caller's estimate of
    its largest working set, `what` says what `name` asks for."""
    limit = memory_limit()
    if nbytes > limit:
        source = MEMORY_LIMIT_ENV if os.environ.get(MEMORY_LIMIT_ENV) else "half the memory"
        raise ValueError(
            f"`{name}` asks for {what}, about {_bytes(nbytes)}, more than the limit of "
            f"{_bytes(limit)} ({source}); lower `{name}`, or set {MEMORY_LIMIT_ENV} (e.g. "
            "=64G) if you know it fits"
        )


def max_entries() -> int:
    """The guard on counts that multiply a study's work (entries of a config list, the
    sampling study's `max_steps`): ``MCM_PROB_MAX_ENTRIES`` if set, else 1000."""
    text = os.environ.get(MAX_ENTRIES_ENV, "").strip()
    if not text:
        return 1000
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{MAX_ENTRIES_ENV} must be an integer, got {text!r}") from None


def check_count(name: str, n: int, what: str) -> None:
    """Refuse, before any work, a count that multiplies the work past `max_entries()` (a
    study that would run for hours or days without a word)."""
    limit = max_entries()
    if n > limit:
        raise ValueError(
            f"`{name}` has {n} {what}, more than {limit}: each one multiplies the work (hours "
            f"to days); lower it or split the study (several configs, `--part`), or set {MAX_ENTRIES_ENV} "
            "if you mean it"
        )


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} PiB"  # pragma: no cover


def _scalar(value):
    """A concrete 0-d numpy or JAX array as its numpy scalar (so ``np.int64(8)``,
    ``jnp.int32(8)`` and ``8`` are treated alike); anything else unchanged."""
    if isinstance(value, (np.ndarray, jax.Array)) and not isinstance(value, jax.core.Tracer):
        if value.ndim == 0:
            return np.asarray(value)[()]
    return value


def integer(name: str, value, *, ge: int = 1, lt: int | None = None) -> int:
    """An integer (Python, numpy or 0-d JAX; not a bool, not a float) with ge <= value (< lt);
    returns int."""
    value = _scalar(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"`{name}` must be an integer >= {ge}, got {value!r}")
    if value < ge or (lt is not None and value >= lt):
        bound = f"in [{ge}, {lt})" if lt is not None else f">= {ge}"
        raise ValueError(f"`{name}` must be an integer {bound}, got {value!r}")
    return int(value)


def number(
    name: str,
    value,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    allow_inf: bool = False,
) -> float:
    """A real scalar (int or float: Python, numpy or 0-d JAX; not bool, not complex) in the
    given bounds, finite unless `allow_inf` (then +inf passes an upper-unbounded check);
    returns float."""
    value = _scalar(value)
    ok = not isinstance(value, (bool, np.bool_)) and isinstance(
        value, (int, float, np.integer, np.floating)
    )
    bounds = [f"> {gt}" if gt is not None else "", f">= {ge}" if ge is not None else ""]
    bounds += [f"< {lt}" if lt is not None else "", f"<= {le}" if le is not None else ""]
    what = "a finite number" if not allow_inf else "a number (inf allowed)"
    what += " " + " and ".join(b for b in bounds if b) if any(bounds) else ""
    v = float(value) if ok else math.nan
    if (
        math.isnan(v)
        or (math.isinf(v) and not (allow_inf and v > 0))
        or (gt is not None and not v > gt)
        or (ge is not None and not v >= ge)
        or (lt is not None and not v < lt)
        or (le is not None and not v <= le)
    ):
        raise ValueError(f"`{name}` must be {what}, got {value!r}")
    return v


def one_of(name: str, value, options):
    """`value` must be one of `options` (compared with ==); returns it."""
    if isinstance(value, (list, dict)) or value not in tuple(options):
        raise ValueError(f"`{name}` must be one of {tuple(options)}, got {value!r}")
    return value


def distinct(name: str, values, item, *, min_len: int = 1, capped: bool = True) -> tuple:
    """A list of at least `min_len` distinct items, each checked by `item(f"{name}[i]", v)`;
    with `capped` (config lists), at most `max_entries()` of them."""
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__iter__"):
        raise ValueError(f"`{name}` must be a list, got {values!r}")
    values = list(values)
    if capped:
        check_count(name, len(values), "entries")
    out = tuple(item(f"{name}[{i}]", v) for i, v in enumerate(values))
    if len(out) < min_len or len(set(out)) != len(out):
        raise ValueError(
            f"`{name}` must be a list of at least {min_len} distinct value(s), got {list(values)!r}"
        )
    return out


def seeds(name: str, values, *, capped: bool = True) -> tuple[int, ...]:
    """Distinct integer seeds in [0, 2**32) (`capped` as `distinct`)."""
    return distinct(name, values, lambda n, v: integer(n, v, ge=0, lt=2**32), capped=capped)


def prng_key(name: str, value, *, stacked: bool = False):
    """A JAX PRNG key: typed (``jax.random.key(seed)``) or raw (``jax.random.PRNGKey(seed)``,
    uint32); with `stacked`, one key per model along a leading axis. Tracers of either kind
    pass. Returns `value`."""
    dtype, shape = getattr(value, "dtype", None), getattr(value, "shape", None)
    ndim = 1 if stacked else 0
    if dtype is not None and shape is not None:
        if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) and len(shape) == ndim:
            return value
        if dtype == np.uint32 and len(shape) == ndim + 1:
            return value
    what = "a stack of JAX PRNG keys (one per model)" if stacked else "a JAX PRNG key"
    got = f"shape {tuple(shape)} {dtype}" if shape is not None else type(value).__name__
    raise TypeError(f"`{name}` must be {what} from jax.random.key(seed), got {got}")


def finite_or_raise(x, message: str):
    """Return x, raising `FloatingPointError(message)` if it holds NaN or inf.

    Eagerly this is a Python exception; under `jax.jit` it becomes an `equinox.error_if`
    runtime error with the same message. Nothing non-finite leaves silently.
    """
    if isinstance(x, jax.core.Tracer):
        return eqx.error_if(x, ~jnp.all(jnp.isfinite(x)), message)
    if not bool(_all_finite(x)):
        raise FloatingPointError(message)
    return x


@jax.jit
def _all_finite(x):
    """Whether every entry of x is finite: one compiled program per shape and dtype."""
    return jnp.all(jnp.isfinite(x))


def error_array(errors, *, along: str = "step", min_values: int = 2):
    """Positive errors as an `xarray.DataArray` ordered (*groups, ALONG, seed), ALONG
    increasing: at least `min_values` distinct finite values > 0 of ALONG, 2 seeds, and every
    error finite and > 0 (the dims other than ALONG and ``seed`` index groups)."""
    import xarray as xr

    if not isinstance(errors, xr.DataArray):
        raise TypeError(f"`errors` must be an xarray.DataArray, got {type(errors).__name__}")
    missing = {along, "seed"} - set(errors.dims)
    if missing:
        raise ValueError(
            f"`errors` needs dims ({along!r}, 'seed') (others index groups); missing {sorted(missing)}"
        )
    groups = [d for d in errors.dims if d not in (along, "seed")]
    empty = [d for d in groups if errors.sizes[d] == 0]
    if empty:
        raise ValueError(f"`errors` group dim(s) {empty} are empty: no group to fit")
    errors = errors.transpose(*groups, along, "seed").sortby(along)
    x = np.asarray(errors[along].values, float)
    if x.size < min_values or errors.sizes["seed"] < 2:
        raise ValueError(
            f"`errors` needs at least {min_values} {along}s and 2 seeds, "
            f"got {x.size} and {errors.sizes['seed']}"
        )
    if not (np.all(np.isfinite(x)) and np.all(x > 0) and np.all(np.diff(x) > 0)):
        raise ValueError(
            f"`errors` coordinate {along!r} must be distinct finite values > 0, got {x}"
        )
    vals = np.asarray(errors.values, float)
    if not np.all(np.isfinite(vals)) or np.any(vals <= 0):
        raise ValueError("`errors` must be finite and > 0 (drop failed runs first)")
    return errors
