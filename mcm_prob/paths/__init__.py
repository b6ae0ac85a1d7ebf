r"""Gaussian paths $x_t = a(t) x_0 + b(t) z$: the public base `AbstractPath` and the paths of the
field (`OrnsteinUhlenbeck` = `OU`, the default; `VP`, `VE`, `LinearInterpolant`, `TrigFlow`,
`CustomPath`). Specs (`from_spec`, `path.to_spec()`) round-trip like data specs."""

from .base import AbstractPath
from .library import (
    OU,
    PATHS,
    VE,
    VP,
    CustomPath,
    LinearInterpolant,
    OrnsteinUhlenbeck,
    TrigFlow,
    as_path,
    describe,
    from_spec,
    path_of,
)

__all__ = [
    "AbstractPath",
    "OrnsteinUhlenbeck",
    "OU",
    "VP",
    "VE",
    "LinearInterpolant",
    "TrigFlow",
    "CustomPath",
    "PATHS",
    "from_spec",
    "describe",
    "as_path",
    "path_of",
]
