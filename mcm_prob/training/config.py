"""Settings of a fit, apart from the objective: network, optimiser and loop (`FitConfig`), and
`TrainConfig`, the flat one-object route to CD and CT (it splits into an objective and a
`FitConfig`)."""

from __future__ import annotations

import dataclasses
import json
import math

import jax.numpy as jnp
import optax

from .._checks import integer, number, one_of
from ..networks import NETWORK_FORMS, network
from ..paths import AbstractPath, path_of
from ..paths import describe as describe_path
from .consistency import CD, CT, DISTANCES, TEACHERS, TIME_SAMPLINGS

__all__ = ["TrainConfig", "FitConfig", "NetworkConfig", "OptimizerConfig"]

_SCHEDULES = ("constant", "cosine")


def _grid_size(T: float, delta: float, step: float) -> int:
    n = math.floor((T - delta) / step + 1e-9)
    if n < 1:
        raise ValueError(
            f"`step` = {step} is larger than T - delta = {T - delta}: the grid has no "
            "interval; use 0 < step <= T - delta"
        )
    return n


_DTYPES = ("float32", "float64")


@dataclasses.dataclass(frozen=True)
class NetworkConfig:
    """The network: `form` (``"boundary"``: `ConsistencyNet`, ``"displacement"``:
    `DisplacementNet`), `width`, `depth` (hidden layers), `n_freq` (Fourier features per time),
    `dtype` (``"float32"`` or ``"float64"``)."""

    form: str = "boundary"
    width: int = 128
    depth: int = 3
    n_freq: int = 4
    dtype: str = "float32"

    def __post_init__(self):
        one_of("form", self.form, tuple(NETWORK_FORMS))
        one_of("dtype", self.dtype, _DTYPES)
        integer("width", self.width, ge=1)
        integer("depth", self.depth, ge=0)
        integer("n_freq", self.n_freq, ge=0)

    def build(self, dim: int, path: AbstractPath, key):
        """A freshly initialised net for data of dimension `dim` on `path`."""
        return network(
            self.form,
            dim,
            width=self.width,
            depth=self.depth,
            n_freq=self.n_freq,
            key=key,
            dtype=jnp.dtype(self.dtype),
            path=path,
        )


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Adam (optax) with `learning_rate`, `schedule` (``"constant"``, with a linear warm-up of
    `warmup_iterations` if > 0; or ``"cosine"``: warm-up then cosine decay to 0 at the last
    iteration) and `grad_clip` (global-norm clipping; None = off)."""

    learning_rate: float = 1e-3
    schedule: str = "constant"
    warmup_iterations: int = 0
    grad_clip: float | None = None

    def __post_init__(self):
        number("learning_rate", self.learning_rate, gt=0)
        one_of("lr_schedule", self.schedule, _SCHEDULES)
        integer("warmup_iterations", self.warmup_iterations, ge=0)
        if self.grad_clip is not None:
            number("grad_clip", self.grad_clip, gt=0)

    def build(self, iterations: int) -> optax.GradientTransformation:
        if self.schedule == "constant":
            lr = self.learning_rate
            if self.warmup_iterations:
                lr = optax.linear_schedule(0.0, self.learning_rate, self.warmup_iterations)
        else:
            lr = optax.warmup_cosine_decay_schedule(
                0.0, self.learning_rate, self.warmup_iterations, iterations
            )
        adam = optax.adam(lr)
        if self.grad_clip is None:
            return adam
        return optax.chain(optax.clip_by_global_norm(self.grad_clip), adam)


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """The loop of a fit, for any objective.

    - `path` (object or spec, default OU), `T`, `delta`: examples live on [delta, T] of the
      path (delta > 0 for non-smooth data).
    - `iterations`, `batch_size`; `network` (`NetworkConfig`), `optimizer` (`OptimizerConfig`).
    - `ema_decay`: EMA of the weights returned for evaluation (0 = the online weights), warmed
      up as min(ema_decay, (1 + i)/(10 + i)); `target_decay`: 0 = the target is the
      stop-gradient online net (iCT), > 0 = an EMA target.
    - `train_size`: None = fresh x_0 every iteration; n = one fixed training set of n draws per
      model (`mcm_prob.training_set`).
    - `chunk_size`: iterations per compiled chunk (progress granularity); `progress`: show it.
    """

    path: AbstractPath | str | dict = "ou"
    T: float = 4.0
    delta: float = 0.01
    iterations: int = 2000
    batch_size: int = 256
    network: NetworkConfig = NetworkConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    ema_decay: float = 0.999
    target_decay: float = 0.0
    train_size: int | None = None
    chunk_size: int = 250
    progress: bool = True

    def __post_init__(self):
        object.__setattr__(self, "path", path_of(self.path))
        self.path.check_time("T", self.T)
        number("T", self.T, gt=0)
        number("delta", self.delta, ge=0, lt=self.T)
        for name in ("iterations", "batch_size", "chunk_size"):
            integer(name, getattr(self, name), ge=1)
        for name in ("ema_decay", "target_decay"):
            number(name, getattr(self, name), ge=0, lt=1)
        if self.train_size is not None:
            integer("train_size", self.train_size, ge=1)
        for name, kind in (("network", NetworkConfig), ("optimizer", OptimizerConfig)):
            if not isinstance(getattr(self, name), kind):
                raise TypeError(f"`{name}` must be a {kind.__name__}, got {getattr(self, name)!r}")
        if not isinstance(self.progress, bool):
            raise ValueError(f"`progress` must be True or False, got {self.progress!r}")

    def grid_size(self, step: float) -> int:
        """N = floor((T - delta) / Delta): the number of grid intervals (>= 1 required)."""
        return _grid_size(self.T, self.delta, step)


_CHOICES = {
    "method": ("cd", "ct"),
    "teacher": TEACHERS,
    "lr_schedule": _SCHEDULES,
    "loss": DISTANCES,
    "time_sampling": TIME_SAMPLINGS,
    "dtype": _DTYPES,
    "network": tuple(NETWORK_FORMS),
}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines one CD or CT fit, flat (`objective()` and `fit_config()` split
    it into a `CD`/`CT` objective and a `FitConfig`; `mcm_prob.training.consistency` has the maths).

    - `method`: ``"cd"`` (distillation with the exact score) or ``"ct"`` (training).
    - `step`: the discretization step Delta > 0 of the time grid.
    - `teacher`: CD teacher step, ``"euler"`` (default, as in the estimation study), ``"heun"``
      or ``"exact"`` (ignored by CT).
    - `T`, `delta`: the grid covers [delta, T]; delta > 0 for non-smooth data.
    - `iterations`, `batch_size`: optimisation length and examples per iteration.
    - `width`, `depth`, `n_freq`: MLP width, hidden layers, Fourier features per time;
      `network`: ``"boundary"`` (`ConsistencyNet`, default) or ``"displacement"``.
    - `learning_rate`, `lr_schedule` (``"constant"``/``"cosine"``), `warmup_iterations`,
      `grad_clip` (global-norm clipping, None = off): Adam via optax.
    - `ema_decay`: EMA of the weights returned for evaluation (0 = return the online weights),
      warmed up as min(ema_decay, (1 + i) / (10 + i)) at iteration i so that short runs are not
      dominated by the initial weights.
    - `target_decay`: 0 = target is the stop-gradient online net (iCT); > 0 = EMA target.
    - `loss`: ``"l2"`` (squared distance) or ``"pseudo_huber"`` with `huber_c` (None = iCT's).
    - `time_sampling`: ``"uniform"`` or ``"lognormal"`` (`lognormal_loc`, `lognormal_scale`).
    - `teacher_rtol`, `teacher_atol`: ODE tolerances of the exact teacher for non-Gaussian data.
    - `train_size`: None (default) draws fresh x_0 every iteration (infinite data); an integer
      n fixes one training set of n draws of x_0 per model (`training_set`), from which every
      batch draws uniformly with replacement (fresh noise z every time), for CD and CT alike.
    - `dtype`: parameter and network dtype, ``"float32"`` (default) or ``"float64"``.
    - `path`: the Gaussian path, an `mcm_prob.paths` object or its spec (``"vp"``,
      ``{"path": "vp", "beta_min": 0.1, "beta_max": 20.0}``); default ``"ou"``. `T` must lie in
      its time range. Stored as its spec in `to_json`.
    - `chunk_size`: iterations per compiled chunk (progress-bar granularity); `progress`: show it.
    """

    method: str = "cd"
    step: float = 0.1
    teacher: str = "euler"
    T: float = 4.0
    delta: float = 0.01
    iterations: int = 2000
    batch_size: int = 256
    width: int = 128
    depth: int = 3
    n_freq: int = 4
    learning_rate: float = 1e-3
    lr_schedule: str = "constant"
    warmup_iterations: int = 0
    grad_clip: float | None = None
    ema_decay: float = 0.999
    target_decay: float = 0.0
    loss: str = "l2"
    huber_c: float | None = None
    time_sampling: str = "uniform"
    lognormal_loc: float = -0.5
    lognormal_scale: float = 1.2
    teacher_rtol: float = 1e-6
    teacher_atol: float = 1e-6
    train_size: int | None = None
    dtype: str = "float32"
    chunk_size: int = 250
    progress: bool = True
    path: AbstractPath | str | dict = "ou"
    network: str = "boundary"

    def __post_init__(self):
        object.__setattr__(self, "path", path_of(self.path))
        self.path.check_time("T", self.T)
        for name, options in _CHOICES.items():
            one_of(name, getattr(self, name), options)
        for name, low in (
            ("iterations", 1),
            ("batch_size", 1),
            ("width", 1),
            ("depth", 0),
            ("n_freq", 0),
            ("warmup_iterations", 0),
            ("chunk_size", 1),
        ):
            integer(name, getattr(self, name), ge=low)
        for name in (
            "step",
            "T",
            "learning_rate",
            "lognormal_scale",
            "teacher_rtol",
            "teacher_atol",
        ):
            number(name, getattr(self, name), gt=0)
        if self.train_size is not None:
            integer("train_size", self.train_size, ge=1)
        for name in ("grad_clip", "huber_c"):
            if getattr(self, name) is not None:
                number(name, getattr(self, name), gt=0)
        number("delta", self.delta, ge=0, lt=self.T)
        number("lognormal_loc", self.lognormal_loc)
        for name in ("ema_decay", "target_decay"):
            number(name, getattr(self, name), ge=0, lt=1)
        if not isinstance(self.progress, bool):
            raise ValueError(f"`progress` must be True or False, got {self.progress!r}")
        self.grid_size(self.step)

    def grid_size(self, step: float | None = None) -> int:
        """N = floor((T - delta) / Delta): the number of grid intervals (>= 1 required)."""
        return _grid_size(self.T, self.delta, self.step if step is None else step)

    def objective(self) -> CD | CT:
        """The `CD` or `CT` objective these settings describe."""
        grid = dict(
            distance=self.loss,
            huber_c=self.huber_c,
            time_sampling=self.time_sampling,
            lognormal_loc=self.lognormal_loc,
            lognormal_scale=self.lognormal_scale,
        )
        if self.method == "ct":
            return CT(**grid)
        return CD(teacher=self.teacher, rtol=self.teacher_rtol, atol=self.teacher_atol, **grid)

    def fit_config(self) -> FitConfig:
        """The loop, network and optimiser settings as a `FitConfig`."""
        return FitConfig(
            path=self.path,
            T=self.T,
            delta=self.delta,
            iterations=self.iterations,
            batch_size=self.batch_size,
            network=NetworkConfig(self.network, self.width, self.depth, self.n_freq, self.dtype),
            optimizer=OptimizerConfig(
                self.learning_rate, self.lr_schedule, self.warmup_iterations, self.grad_clip
            ),
            ema_decay=self.ema_decay,
            target_decay=self.target_decay,
            train_size=self.train_size,
            chunk_size=self.chunk_size,
            progress=self.progress,
        )

    def to_json(self) -> str:
        """The config as a JSON string (for provenance attrs); the path as its spec."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return json.dumps(fields | {"path": describe_path(self.path)}, sort_keys=True)
