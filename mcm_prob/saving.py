r"""Saved models: a fitted network with its training config and data spec, in one file.

    mcm_prob.save_model("cd.eqx", model, config, data=mixture)
    model = mcm_prob.load_model("cd.eqx")     # a TrainedModel
    model.trained_range                        # (delta, T) of its training grid
    mcm_prob.sample(model, key, n, dim=..., schedule=...)   # refuses times outside that range

**Format.** One line of UTF-8 JSON (the header), a newline, then the network's arrays as
written by `equinox.tree_serialise_leaves` (numpy's ``.npy`` encoding per leaf, no pickle):

    {"format": "mcm_prob.model", "version": 1, "mcm_prob": "0.1.0",
     "network": {"dim": 2, "width": 128, "depth": 3, "n_freq": 4, "dtype": "float32"},
     "train_config": {... every TrainConfig field ...}, "data": {... data spec ...} | null,
     "trained_range": [delta, T]}

`load_model` rebuilds the network skeleton from the header and reads the arrays into it, so the
loaded network gives bit-identical outputs. Files are written atomically
(`mcm_prob.results.write_atomic`).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import equinox as eqx
import jax
import numpy as np

from .networks import NETWORK_FORMS, AbstractSkipNet, network
from .results import write_atomic
from .training import TrainConfig, TrainedModel

__all__ = ["save_model", "load_model", "FORMAT", "VERSION"]

FORMAT, VERSION = "mcm_prob.model", 1
_MAX_HEADER = 16 * 2**20  # bytes: a header is a few kB; refuse to parse more
MAX_PARAMETERS = 10**8  # `load_model` refuses a header announcing a larger network
# what a header may announce, checked before anything is built: (smallest, largest)
_NETWORK_BOUNDS = {"dim": (1, 2**20), "width": (1, 2**16), "depth": (0, 1024), "n_freq": (0, 4096)}


def _data_spec(data) -> dict | None:
    from .data import DataDistribution, describe

    if data is None:
        return None
    if not isinstance(data, DataDistribution):
        raise TypeError(
            f"`data` must be a mcm_prob.data.DataDistribution or None, got {type(data).__name__}"
        )
    return describe(data)  # a user family without a spec: class path, repr and array hash


def save_model(path: str | os.PathLike, model, config: TrainConfig | None = None, *, data=None):
    """Save a fitted network with its training config (and the data spec) to `path`.

    **Arguments:** `model`: a `ConsistencyNet` (as `fit` returns it; then `config` is
    required) or a `TrainedModel` (carries its config and data spec; `config`/`data` given
    here replace them); `data`: the training distribution, stored as its spec.
    **Returns:** the path. Raises `mcm_prob.results.ResultsWriteError` when it cannot write.
    """
    spec = None
    if isinstance(model, TrainedModel):
        config = config if config is not None else model.config
        spec = json.loads(model.data_spec) if model.data_spec is not None else None
        model = model.net
    if not isinstance(model, AbstractSkipNet):
        raise TypeError(
            "`model` must be a ConsistencyNet, DisplacementNet or TrainedModel, got "
            f"{type(model).__name__}"
        )
    if not isinstance(config, TrainConfig):
        raise TypeError(f"`config` must be the model's TrainConfig, got {type(config).__name__}")
    if type(model) is not NETWORK_FORMS[config.network]:
        raise ValueError(
            f"`model` is a {type(model).__name__} but `config.network` = {config.network!r} "
            f"says {NETWORK_FORMS[config.network].__name__}"
        )
    if data is not None:
        spec = _data_spec(data)
    mlp = model.mlp
    header = {
        "format": FORMAT,
        "version": VERSION,
        "mcm_prob": _version(),
        "network": {
            "dim": model.dim,
            "width": mlp.width_size,
            "depth": mlp.depth,
            "n_freq": model.n_freq,
            "dtype": str(model.dtype),
        },
        "train_config": json.loads(config.to_json()),
        "data": spec,
        "trained_range": [float(config.delta), float(config.T)],
    }
    buffer = io.BytesIO()
    buffer.write(json.dumps(header, sort_keys=True).encode() + b"\n")
    eqx.tree_serialise_leaves(buffer, model)
    return write_atomic(path, buffer.getvalue())


def load_model(path: str | os.PathLike, *, max_parameters: int = MAX_PARAMETERS) -> TrainedModel:
    """Load a model written by `save_model` as a `TrainedModel` (network, config, data spec).

    A file is not trusted: the header's network fields must be integers within bounds and
    announce at most `max_parameters` parameters (raise it for a larger net you trust) before
    anything is built; the arrays must match the header's network exactly, with no bytes
    after the last one, in a dtype this process computes in (a float64 net needs JAX's x64
    mode), and be finite. Raises `ValueError` naming the path and what is wrong when the file
    is not a saved model, is damaged or fails a check.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no saved model at {path}")
    with path.open("rb") as f:
        line = f.readline(_MAX_HEADER + 1)
        rest = f.read()
    try:
        header = json.loads(line)
        ok = isinstance(header, dict) and header.get("format") == FORMAT
    except (ValueError, RecursionError):
        ok = False
    if not ok or not line.endswith(b"\n"):
        raise ValueError(f"{path} is not a mcm_prob saved model (no {FORMAT!r} header)")
    if header.get("version") != VERSION:
        raise ValueError(
            f"{path} is a saved model of format version {header.get('version')!r}; "
            f"this mcm_prob reads version {VERSION}"
        )
    stored_path = header.get("train_config", {}).get("path")
    if isinstance(stored_path, dict) and stored_path.get("path") == "custom":
        raise ValueError(
            f"{path}: the model was trained on a user path ({stored_path.get('repr')}), which "
            "a file cannot rebuild; rebuild the network with ConsistencyNet(..., path=your_path) (or DisplacementNet) "
            "and equinox.tree_deserialise_leaves"
        )
    net_args = _network_args(path, header.get("network"), max_parameters)
    try:
        config = TrainConfig(**header["train_config"])
        skeleton = network(config.network, **net_args, key=jax.random.key(0), path=config.path)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: damaged saved model ({type(err).__name__}: {err})") from err
    stream = io.BytesIO(rest)
    try:
        net = eqx.tree_deserialise_leaves(stream, skeleton)
    except (ValueError, RuntimeError, EOFError) as err:
        raise ValueError(
            f"{path}: damaged saved model: the arrays are cut short or do not match the "
            f"header's network {net_args} ({type(err).__name__}: {err})"
        ) from err
    if stream.tell() != len(rest):
        raise ValueError(
            f"{path}: {len(rest) - stream.tell()} bytes after the network's last array "
            "(a damaged or altered file)"
        )
    if not all(
        bool(np.all(np.isfinite(a))) for a in jax.tree.leaves(eqx.filter(net, eqx.is_array))
    ):
        raise ValueError(f"{path}: the network has non-finite (NaN or inf) weights")
    spec = header.get("data")
    return TrainedModel(net, config, None if spec is None else json.dumps(spec, sort_keys=True))


def _network_args(path: Path, net, max_parameters: int) -> dict:
    """The header's network fields, checked: integers within `_NETWORK_BOUNDS`, a dtype this
    process computes in, and at most `max_parameters` parameters (an MLP of `depth` hidden
    layers of `width` on the input x and the time features)."""
    if not isinstance(net, dict):
        raise ValueError(f"{path}: damaged saved model (no 'network' table in the header)")
    args = {}
    for key, (lo, hi) in _NETWORK_BOUNDS.items():
        value = net.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ValueError(
                f"{path}: the header's network {key!r} must be an integer in [{lo}, {hi}], "
                f"got {value!r}"
            )
        args[key] = value
    dtype = net.get("dtype")
    if dtype not in ("float32", "float64"):
        raise ValueError(
            f"{path}: the header's network 'dtype' must be float32 or float64, got {dtype!r}"
        )
    if dtype == "float64" and not jax.config.jax_enable_x64:
        raise ValueError(
            f"{path}: the network was saved in float64; enable JAX's x64 mode "
            '(jax.config.update("jax_enable_x64", True)) before loading it'
        )
    d, w, depth = args["dim"], args["width"], args["depth"]
    inputs = d + 4 * args["n_freq"] + 2  # generous: x, Fourier features of both times, times
    count = (inputs + 1) * w + max(depth - 1, 0) * (w + 1) * w + (w + 1) * d
    if count > max_parameters:
        raise ValueError(
            f"{path}: the header announces about {count:,} parameters (dim {d}, width {w}, "
            f"depth {depth}), more than `max_parameters` = {max_parameters:,}; pass a larger "
            "`max_parameters` to load a network this large that you trust"
        )
    return args | {"dtype": dtype}


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("mcm_prob")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"
