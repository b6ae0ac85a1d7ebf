"""Argument validation shared by every stage.

Checks run on concrete (non-traced) values only, so that public functions raise a clear
`ValueError`/`TypeError` before any heavy work starts, and stay usable under `jax.jit`
(where arguments are tracers and the caller is responsible for their ranges).
"""

from __future__ import annotations

import jax
import numpy as np


def concrete(value) -> np.ndarray | None:
    """Return `value` as a float64 numpy array, or None if it is a JAX tracer."""
    if isinstance(value, jax.core.Tracer):
        return None
    try:
        return np.asarray(value, dtype=np.float64)
    except jax.errors.TracerArrayConversionError:  # pragma: no cover - defensive
        return None
    except (TypeError, ValueError) as err:
        raise TypeError(f"expected a real number or array, got {type(value).__name__}") from err


def real_array(name: str, value, *, ndim: int | None = None) -> np.ndarray:
    """Validate a concrete, finite, real array argument and return it as float64 numpy."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"`{name}` must be a real array, got {type(value).__name__}") from err
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"`{name}` must have {ndim} dimension(s), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"`{name}` must be finite (no NaN or inf)")
    return arr


def check_time(name: str, t, *, positive: bool = False) -> None:
    """Check a concrete time: finite and t >= 0 (t > 0 if `positive`). Tracers pass."""
    arr = concrete(t)
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


def check_times(t, s, *, s_positive: bool = False) -> None:
    """Check 0 <= s <= t (0 < s if `s_positive`) on concrete values."""
    check_time("t", t)
    check_time("s", s, positive=s_positive)
    ta, sa = concrete(t), concrete(s)
    if ta is not None and sa is not None and sa > ta:
        raise ValueError(f"need 0 <= s <= t, got s={float(sa)} > t={float(ta)}")


def check_points(name: str, x, dim: int) -> None:
    """Check that the trailing axis of `x` has size `dim` and its values are finite."""
    shape = np.shape(x)
    if len(shape) == 0 or shape[-1] != dim:
        raise ValueError(
            f"`{name}` must have trailing dimension {dim} (the data dim), got shape {shape}"
        )
    arr = concrete(x)
    if arr is not None and not np.all(np.isfinite(arr)):
        raise ValueError(f"`{name}` must be finite (no NaN or inf)")


def finite_or_raise(x, message: str):
    """Return x, raising `FloatingPointError(message)` if it holds NaN or inf.

    Eagerly this is a Python exception; under `jax.jit` it becomes an `equinox.error_if`
    runtime error with the same message. Nothing non-finite leaves silently.
    """
    import equinox as eqx
    import jax.numpy as jnp

    bad = ~jnp.all(jnp.isfinite(x))
    if isinstance(bad, jax.core.Tracer):
        return eqx.error_if(x, bad, message)
    if bool(bad):
        raise FloatingPointError(message)
    return x
