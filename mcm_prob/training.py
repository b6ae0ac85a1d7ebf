r"""Fitting consistency functions with an explicit discretization step $\Delta$.

**Time grid.** $t_n = \delta + n\Delta$, $n = 0, \dots, N$, $N = \lfloor (T - \delta)/\Delta \rfloor$
(so $\Delta$ is exact and $t_N \le T$). Each training example draws an index $n \in \{1..N\}$,
sets $t = t_n$, $t - \Delta = t_{n-1}$, and a target time $s = t_m$ with $m$ uniform in
$\{0..n-1\}$ ($m = n-1$ gives $s = t - \Delta$, where the target is the boundary value itself).

**Path.** Every time is in the units of `config.path` (default OU; any `mcm_prob.paths` path),
and $x_t = a_t x_0 + b_t z$ on it (OU: $a = \alpha$, $b = \sigma$).

**Losses.** With $x_t = a_t x_0 + b_t z$, $x_0 \sim p_0$, $z \sim N(0, I)$:

* consistency distillation (``method="cd"``): $\hat x_{t-\Delta} = \Psi_\Delta(x_t, t)$, one
  teacher step of the path's PF-ODE (OU: $\dot x = -x - \nabla\log p_t(x)$) with the exact score:
  Euler $\hat x = x_t - \Delta v(x_t, t)$; Heun (trapezoidal corrector); or the exact flow
  $\Phi_{t\to t-\Delta}$ (``"exact"``: isolates learning error from solver error);
* consistency training (``method="ct"``): $\hat x_{t-\Delta} = a_{t-\Delta}x_0 + b_{t-\Delta}z$
  with the same $(x_0, z)$ (unbiased only as $\Delta \to 0$);

$$L(\theta) = E\, d\big(f_\theta(x_t, t, s),\; \mathrm{sg}[f_{\theta^-}(\hat x_{t-\Delta}, t-\Delta, s)]\big),$$

with $d$ the squared L2 distance or pseudo-Huber $\sqrt{\|u\|^2 + c^2} - c$ (iCT:
$c = 0.00054\sqrt{d}$), and $\theta^-$ the online weights (``target_decay=0``, improved CT) or
an EMA of them. The fixed point of CD is the composition of teacher steps along the grid, so
the learned map inherits the teacher's discretization error; with the exact teacher only
learning error remains.

**Time sampling.** ``"uniform"`` over $n$, or ``"lognormal"``: $t$ drawn from a lognormal
($\log t \sim N(\mu, s^2)$) truncated to $(\delta, t_N]$ and rounded up to the grid, i.e.
$P(n) \propto \Phi(\frac{\log t_n - \mu}{s}) - \Phi(\frac{\log t_{n-1} - \mu}{s})$ (iCT).

**Fitting.** Every model of a grid of $(\Delta, \text{seed})$ pairs is trained in one
`jax.jit`-compiled program: `jax.vmap` over models (sharded over every local device),
`lax.scan` over iterations, chunked for a progress bar. A non-finite loss freezes that model (its later losses are NaN) and
records the iteration; `fit` then raises, `fit_grid` marks the model as failed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.scipy.special import ndtr, ndtri
from jaxtyping import Array, ArrayLike
from tqdm.auto import tqdm

from . import _checks
from ._checks import integer, number, one_of, prng_key
from .data import DataDistribution, check_data, from_spec
from .flow import flow_map, pf_ode_step
from .networks import ConsistencyNet
from .paths import AbstractPath, as_path, path_of
from .paths import describe as describe_path

__all__ = [
    "TrainConfig",
    "fit",
    "fit_grid",
    "FittedGrid",
    "TrainingDiverged",
    "teacher_map",
    "training_set",
    "training_batch",
    "time_indices",
]

_CHOICES = {
    "method": ("cd", "ct"),
    "teacher": ("euler", "heun", "exact"),
    "lr_schedule": ("constant", "cosine"),
    "loss": ("l2", "pseudo_huber"),
    "time_sampling": ("uniform", "lognormal"),
    "dtype": ("float32", "float64"),
}


class TrainingDiverged(FloatingPointError):
    """A model's loss became NaN/inf during training. `.iteration` is where, `.history` holds
    the losses up to then (NaN afterwards), so nothing computed is lost."""

    def __init__(self, message: str, *, iteration: int = -1, history: dict | None = None):
        super().__init__(message)
        self.iteration, self.history = iteration, history


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines one consistency-model fit (see the module docstring for the maths).

    - `method`: ``"cd"`` (distillation with the exact score) or ``"ct"`` (training).
    - `step`: the discretization step Delta > 0 of the time grid.
    - `teacher`: CD teacher step, ``"euler"``, ``"heun"`` or ``"exact"`` (ignored by CT).
    - `T`, `delta`: the grid covers [delta, T]; delta > 0 for non-smooth data.
    - `iterations`, `batch_size`: optimisation length and examples per iteration.
    - `width`, `depth`, `n_freq`: MLP width, hidden layers, Fourier features per time.
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
    teacher: str = "heun"
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
        step = self.step if step is None else step
        n = math.floor((self.T - self.delta) / step + 1e-9)
        if n < 1:
            raise ValueError(
                f"`step` = {step} is larger than T - delta = {self.T - self.delta}: the grid has "
                "no interval; use 0 < step <= T - delta"
            )
        return n

    def to_json(self) -> str:
        """The config as a JSON string (for provenance attrs); the path as its spec."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return json.dumps(fields | {"path": describe_path(self.path)}, sort_keys=True)


def _distance(diff: jax.Array, cfg: TrainConfig) -> jax.Array:
    sq = jnp.sum(diff**2, -1)
    if cfg.loss == "l2":
        return sq
    c = cfg.huber_c if cfg.huber_c is not None else 0.00054 * math.sqrt(diff.shape[-1])
    return jnp.sqrt(sq + c**2) - c


def _teacher(data: DataDistribution, cfg: TrainConfig, x, t, t_prev):
    """One backward PF-ODE step from t to t_prev = t - Delta, per sample (x: (B, d), t: (B,))."""
    return _teacher_step(
        data, cfg.path, cfg.teacher, cfg.teacher_rtol, cfg.teacher_atol, x, t, t_prev
    )


def _teacher_step(data, path, teacher: str, rtol, atol, x, t, t_prev):
    if teacher == "exact":
        one = lambda xi, ti, tpi: flow_map(data, xi, ti, tpi, path=path, rtol=rtol, atol=atol)  # noqa: E731
        return jax.vmap(one)(x, t, t_prev)
    return pf_ode_step(data, x, t, t_prev, teacher, path)


@eqx.filter_jit
def _teacher_chain(data, path, teacher: str, rtol, atol, x, t, step, n):
    """n teacher steps from t (n traced: one compilation for every (t, s, step))."""

    def body(k, x):
        tk = jnp.full(x.shape[:1], t - k * step, x.dtype)
        return _teacher_step(data, path, teacher, rtol, atol, x, tk, tk - step)

    return jax.lax.fori_loop(0, n, body, x)


def teacher_map(
    data: DataDistribution,
    x,
    t: float,
    s: float,
    *,
    step: float,
    teacher: str = "euler",
    rtol: float = 1e-6,
    atol: float = 1e-6,
    path: AbstractPath | None = None,
):
    r"""The teacher's own map from t down to s on `path` (default OU): n = (t - s)/Delta
    composed teacher steps.

    This is the fixed point that CD with this teacher converges to on the grid, so
    $E\|\Psi^{(n)}_\Delta(x) - \Phi_{t\to s}(x)\|^2$ is the discretization part of a learned
    model's error (no learning involved). x: (n_points, dim); (t - s)/step must be an integer.
    """
    one_of("teacher", teacher, _CHOICES["teacher"])
    step = number("step", step, gt=0)
    path = as_path(path)
    path.check_times(t, s)
    n = round((t - s) / step)
    if abs(n * step - (t - s)) > 1e-9 * max(1.0, t):
        raise ValueError(f"(t - s) / step must be an integer, got ({t} - {s}) / {step}")
    x = jnp.asarray(x)
    return _teacher_chain(
        data,
        path,
        teacher,
        rtol,
        atol,
        x,
        jnp.asarray(t, x.dtype),
        jnp.asarray(step, x.dtype),
        jnp.asarray(n, jnp.int32),
    )


def time_indices(key, cfg: TrainConfig, step, n_max, shape):
    """Grid indices n in {1..N} (N = n_max, possibly traced) of shape `shape`, drawn as
    `cfg.time_sampling` says (uniform, or lognormal in the path's time rounded up to the grid:
    the module docstring). Jit-traceable, unvalidated."""
    if cfg.time_sampling == "uniform":
        n = jnp.floor(jax.random.uniform(key, shape) * n_max) + 1
    else:
        t_top = cfg.delta + n_max * step
        lo = ndtr(
            (jnp.log(jnp.maximum(cfg.delta, 1e-30)) - cfg.lognormal_loc) / cfg.lognormal_scale
        )
        hi = ndtr((jnp.log(t_top) - cfg.lognormal_loc) / cfg.lognormal_scale)
        u = lo + (hi - lo) * jax.random.uniform(key, shape)
        t = jnp.exp(cfg.lognormal_loc + cfg.lognormal_scale * ndtri(u))
        n = jnp.ceil((t - cfg.delta) / step - 1e-6)
    return jnp.clip(n, 1, n_max)


def training_set(data: DataDistribution, config: TrainConfig, key: jax.Array) -> jax.Array:
    """The fixed training set, shape (config.train_size, dim), of the model whose seed key is
    `key` (the key `fit` takes; `fit_grid` uses `jax.random.key(seed)`)."""
    if config.train_size is None:
        raise ValueError("`config.train_size` is None: training draws fresh data every iteration")
    return data.sample(jax.random.fold_in(prng_key("key", key), 0x7261696E), config.train_size)


@eqx.filter_jit
def _training_sets(data: DataDistribution, cfg: TrainConfig, keys: jax.Array) -> jax.Array:
    """`training_set` of every model key, (n_models, train_size, dim), as one compiled program."""
    return jax.vmap(lambda k: training_set(data, cfg, k))(keys)


def training_batch(data: DataDistribution, cfg: TrainConfig, step, key, pool=None):
    """One training batch of `cfg.batch_size` examples at step Delta = `step`: (x_t, t,
    x_hat_{t-Delta}, t - Delta, s) on `cfg.path`, in the data's dtype (the module docstring
    says how each is drawn); x_0 from `pool` (n, d) with replacement when given, else fresh
    draws. Jit-traceable, unvalidated: the loop's building block, public for inspection."""
    k_x0, k_z, k_n, k_m = jax.random.split(key, 4)
    b = cfg.batch_size
    if pool is None:
        x0 = data.sample(k_x0, b)
    else:
        x0 = pool[jax.random.randint(k_x0, (b,), 0, pool.shape[0])]
    dtype = x0.dtype
    step = jnp.asarray(step, dtype)
    n_max = jnp.floor((cfg.T - cfg.delta) / step + 1e-9)
    n = time_indices(k_n, cfg, step, n_max, (b,)).astype(dtype)
    m = jnp.floor(jax.random.uniform(k_m, (b,), dtype) * n)
    t, t_prev, s = cfg.delta + n * step, cfg.delta + (n - 1) * step, cfg.delta + m * step
    z = jax.random.normal(k_z, x0.shape, dtype)
    path = cfg.path
    x_t = path.a(t)[:, None] * x0 + path.b(t)[:, None] * z
    if cfg.method == "ct":
        x_prev = path.a(t_prev)[:, None] * x0 + path.b(t_prev)[:, None] * z
    else:
        x_prev = _teacher(data, cfg, x_t, t, t_prev)
    return x_t, t, x_prev, t_prev, s


def _optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    if cfg.lr_schedule == "constant":
        lr = cfg.learning_rate
        if cfg.warmup_iterations:
            lr = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_iterations)
    else:
        lr = optax.warmup_cosine_decay_schedule(
            0.0, cfg.learning_rate, cfg.warmup_iterations, cfg.iterations
        )
    adam = optax.adam(lr)
    return (
        adam
        if cfg.grad_clip is None
        else optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adam)
    )


def _ema(decay, avg, new):
    return jax.tree_util.tree_map(lambda a, p: decay * a + (1 - decay) * p, avg, new)


@eqx.filter_jit
def _run_chunk(state, data, static, cfg: TrainConfig, steps, keys, pools, its):
    """Advance every model by len(its) iterations: vmap over models, lax.scan over iterations."""
    opt = _optimizer(cfg)

    def loss_fn(params, target_params, batch):
        x_t, t, x_prev, t_prev, s = batch
        model, target = eqx.combine(params, static), eqx.combine(target_params, static)
        pred = jax.vmap(model.single)(x_t, t, s)
        tgt = jax.lax.stop_gradient(jax.vmap(target.single)(x_prev, t_prev, s))
        return jnp.mean(_distance(pred - tgt, cfg))

    def per_model(st, step, key, pool):
        def body(st, it):
            params, opt_state, ema, target, failed, failed_at = st
            batch = training_batch(data, cfg, step, jax.random.fold_in(key, it), pool)
            tgt_params = params if cfg.target_decay == 0 else target
            loss, grads = jax.value_and_grad(loss_fn)(params, tgt_params, batch)
            ok = jnp.isfinite(loss) & ~failed
            updates, opt_state = opt.update(grads, opt_state, params)
            # a failed model keeps its weights for good (its optimiser state is then unused);
            # non-finite gradients make the next loss non-finite and are caught there. Masking
            # the update (not selecting between old and new weights) keeps the update in place.
            updates = jax.tree_util.tree_map(lambda u: jnp.where(ok, u, 0), updates)
            params = optax.apply_updates(params, updates)
            if cfg.ema_decay > 0:  # static switches: no work when unused
                ema = _ema(jnp.minimum(cfg.ema_decay, (1.0 + it) / (10.0 + it)), ema, params)
            if cfg.target_decay > 0:
                target = _ema(cfg.target_decay, target, params)
            failed_at = jnp.where(~ok & ~failed, it, failed_at)
            recorded = jnp.where(failed, jnp.nan, loss)
            return (params, opt_state, ema, target, failed | ~ok, failed_at), recorded

        return jax.lax.scan(body, st, its)

    return jax.vmap(per_model)(state, steps, keys, pools)


def _check_data(data: DataDistribution, cfg: TrainConfig) -> None:
    check_data("data", data)
    if data.regime == "nonsmooth" and cfg.delta <= 0:
        raise ValueError(
            f"{type(data).__name__} is non-smooth: `delta` must be > 0 (early stopping), got {cfg.delta}"
        )
    if cfg.dtype == "float64" and not jax.config.jax_enable_x64:
        raise ValueError('`dtype="float64"` needs jax.config.update("jax_enable_x64", True) first')


@eqx.filter_jit
def _init(dim: int, cfg: TrainConfig, keys: jax.Array):
    """Initial training state of len(keys) models, as one compiled program."""
    init_keys, train_keys = jax.vmap(jax.random.split, out_axes=1)(keys)
    make = lambda k: ConsistencyNet(  # noqa: E731
        dim,
        width=cfg.width,
        depth=cfg.depth,
        n_freq=cfg.n_freq,
        key=k,
        dtype=jnp.dtype(cfg.dtype),
        path=cfg.path,
    )
    params, static = eqx.partition(eqx.filter_vmap(make)(init_keys), eqx.is_inexact_array)
    opt_state = jax.vmap(_optimizer(cfg).init)(params)
    m = keys.shape[0]
    state = (params, opt_state, params, params, jnp.zeros(m, bool), jnp.full(m, -1, jnp.int32))
    return state, static, train_keys


def _spread(steps: np.ndarray, keys: jax.Array):
    """Pad the model axis to a multiple of the local device count (repeating the last model)
    and return `place`, which shards a pytree's leading model axis over the devices (a 1-d
    mesh ``"models"``); with one device nothing is padded or moved. Models never interact,
    so the partitioned program computes the single-device models, up to round-off (XLA may
    vectorise another number of models per device differently)."""
    devices = jax.local_devices()
    if len(devices) == 1:
        return steps, keys, lambda tree: tree
    pad = -len(steps) % len(devices)
    if pad:
        steps = np.concatenate([steps, np.repeat(steps[-1:], pad)])
        keys = jnp.concatenate([keys, jnp.repeat(keys[-1:], pad)])
    mesh = jax.sharding.Mesh(np.array(devices), ("models",))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("models"))

    def place(tree):
        return jax.tree_util.tree_map(
            lambda a: jax.device_put(a, rows) if eqx.is_array(a) and a.ndim else a, tree
        )

    return steps, place(keys), place


def _first(tree, n: int):
    """The first n models of a stacked pytree (drops the padding of `_spread`)."""
    return jax.tree_util.tree_map(lambda a: a[:n] if eqx.is_array(a) and a.ndim else a, tree)


def _train(data, cfg: TrainConfig, steps: np.ndarray, keys: jax.Array, desc: str, checkpoints=()):
    """Train len(steps) models (one per (Delta, key)); returns (models, losses, failed_at,
    wall, snapshots) with `snapshots` the evaluation weights after each of `checkpoints`."""
    start = time.perf_counter()
    # fields that do not change the compiled program are normalised, so that fits differing
    # only in Delta (a traced argument), chunking or progress display share one compilation
    run_cfg = dataclasses.replace(cfg, step=cfg.T - cfg.delta, chunk_size=1, progress=False)
    n_models = len(steps)
    steps, keys, place = _spread(np.asarray(steps), keys)
    state, static, train_keys = place(_init(data.dim, run_cfg, keys))
    pools = None
    if cfg.train_size is not None:
        pools = place(_training_sets(data, run_cfg, keys))
    steps_arr = place(jnp.asarray(steps, dtype=jnp.result_type(float)))
    losses, snapshots = [], {}
    n_chunks = math.ceil(cfg.iterations / cfg.chunk_size)
    bounds = np.linspace(0, cfg.iterations, n_chunks + 1).round().astype(int)
    bounds = np.unique(np.concatenate([bounds, np.asarray(checkpoints, int)]))
    with tqdm(total=cfg.iterations, desc=desc, disable=not cfg.progress, leave=False) as bar:
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            its = jnp.arange(lo, hi, dtype=jnp.int32)
            state, chunk_loss = _run_chunk(
                state, data, static, run_cfg, steps_arr, train_keys, pools, its
            )
            chunk_loss = np.asarray(chunk_loss)
            losses.append(chunk_loss)
            if hi in checkpoints:
                snapshots[int(hi)] = _first(
                    eqx.combine(state[2] if cfg.ema_decay > 0 else state[0], static), n_models
                )
            bar.update(int(hi - lo))
            last = chunk_loss[:, -1]
            if np.any(np.isfinite(last)):
                bar.set_postfix(loss=f"{np.nanmean(last):.3g}")
    params, _, ema, _, _, failed_at = state
    final = ema if cfg.ema_decay > 0 else params
    models = _first(eqx.combine(final, static), n_models)
    return (
        models,
        np.concatenate(losses, axis=1)[:n_models],
        np.asarray(failed_at)[:n_models],
        time.perf_counter() - start,
        snapshots,
    )


def fit(data: DataDistribution, config: TrainConfig, key: jax.Array):
    """Fit one consistency function f(x, t, s) to `data` with discretization step `config.step`.

    **Returns:** `(model, history)`: the fitted `ConsistencyNet` (EMA weights when
    `config.ema_decay > 0`) and a dict with ``"loss"`` (shape (iterations,)) and ``"wall_time"``
    (seconds). Raises `TrainingDiverged` naming the iteration if the loss becomes non-finite.
    """
    _check_data(data, config)
    key = prng_key("key", key)
    models, losses, failed_at, wall, _ = _train(
        data, config, np.array([config.step]), jnp.stack([key]), desc=f"fit step={config.step}"
    )
    if failed_at[0] >= 0:
        raise TrainingDiverged(
            f"training diverged: non-finite loss at iteration {int(failed_at[0])} "
            f"with config {config.to_json()}; lower `learning_rate`, set `grad_clip`, or check the data",
            iteration=int(failed_at[0]),
            history={"loss": losses[0], "wall_time": wall},
        )
    model = jax.tree_util.tree_map(lambda a: a[0] if eqx.is_array(a) else a, models)
    return model, {"loss": losses[0], "wall_time": wall}


class TrainedModel(eqx.Module):
    """A fitted consistency function with what it was trained on: the network, its
    `TrainConfig` and (optionally) the data spec, as `mcm_prob.load_model` returns it.

    Calls like the network, `f(x, t, s)`. `trained_range` = (delta, T) is the time range of its
    training grid; `mcm_prob.sample` refuses a schedule that leaves it (``extrapolate=True``
    runs it anyway, with a warning).
    """

    net: ConsistencyNet
    config: TrainConfig = eqx.field(static=True)
    data_spec: str | None = eqx.field(static=True, default=None)  # JSON text

    @property
    def trained_range(self) -> tuple[float, float]:
        return float(self.config.delta), float(self.config.T)

    @property
    def path(self):
        """The Gaussian path the model was trained on (its times are in that path's units)."""
        return self.config.path

    @property
    def data(self):
        """The training data rebuilt from its stored spec (None when no spec was stored)."""
        spec = None if self.data_spec is None else json.loads(self.data_spec)
        return from_spec(spec) if isinstance(spec, dict) and "family" in spec else None

    def __call__(self, x: ArrayLike, t: ArrayLike, s: ArrayLike) -> Array:
        return self.net(x, t, s)


class FittedGrid(eqx.Module):
    """Models fitted on a (Delta, seed) grid; leaves carry leading axes (n_steps, n_seeds).

    `grid[i, j]` is the `ConsistencyNet` of `steps[i]` and `seeds[j]`; `grid(x, t, s)` evaluates
    every model on the same x and returns shape (n_steps, n_seeds, *x.shape).
    """

    models: ConsistencyNet
    steps: tuple[float, ...] = eqx.field(static=True)
    seeds: tuple[int, ...] = eqx.field(static=True)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.steps), len(self.seeds)

    @property
    def path(self):
        """The Gaussian path the models were trained on."""
        return self.models.path

    def __getitem__(self, index: tuple[int, int]) -> ConsistencyNet:
        i, j = index
        return jax.tree_util.tree_map(lambda a: a[i, j] if eqx.is_array(a) else a, self.models)

    def __call__(self, x, t, s):
        dtype = jnp.result_type(float)
        return _grid_call(self.models, x, jnp.asarray(t, dtype), jnp.asarray(s, dtype))


@eqx.filter_jit
def _grid_call(models, x, t, s):
    """Every model of a (rows, cols) stack on the same x: one compiled program."""
    params, static = eqx.partition(models, eqx.is_array)
    call = lambda p: eqx.combine(p, static)(x, t, s)  # noqa: E731
    return jax.vmap(jax.vmap(call))(params)


def fit_grid(
    data: DataDistribution, config: TrainConfig, *, steps, seeds, checkpoints=()
) -> tuple[FittedGrid, dict]:
    """Fit one model per (Delta, seed) pair as a single compiled program.

    `steps`: the Delta values (overriding `config.step`); `seeds`: integer seeds, model (i, j)
    uses `jax.random.key(seeds[j])`, so `fit(data, replace(config, step=steps[i]),
    jax.random.key(seeds[j]))` gives the same model (to float tolerance).

    **Returns:** `(grid, history)` with `history["loss"]` of shape (n_steps, n_seeds, iterations),
    `history["failed_at"]` (n_steps, n_seeds: the iteration at which a model's loss became
    non-finite and its training stopped, or -1) and `history["wall_time"]`.

    `checkpoints`: iterations (1..config.iterations) after which the evaluation weights are
    also kept, as `history["checkpoints"][iteration]` (a `FittedGrid`). With a constant
    learning rate (the default) a checkpoint at k is the model of a k-iteration fit: the
    optimiser, EMA warm-up and data stream do not depend on the total.
    """
    checkpoints = tuple(
        sorted({integer("checkpoints", c, ge=1) for c in np.atleast_1d(checkpoints).tolist()})
    )
    if checkpoints and checkpoints[-1] > config.iterations:
        raise ValueError(
            f"`checkpoints` must lie in 1..iterations = {config.iterations}, got {list(checkpoints)}"
        )
    steps = tuple(float(v) for v in np.atleast_1d(np.asarray(steps, dtype=float)))
    seeds = _checks.seeds("seeds", np.atleast_1d(seeds).tolist())
    if not steps:
        raise ValueError("`steps` must be non-empty")
    for v in steps:
        dataclasses.replace(config, step=v)  # validates each Delta before any work
    _check_data(data, config)
    ns, nk = len(steps), len(seeds)
    flat_steps = np.repeat(np.array(steps), nk)
    keys = jax.vmap(jax.random.key)(jnp.tile(jnp.asarray(seeds, jnp.uint32), ns))
    models, losses, failed_at, wall, snaps = _train(
        data, config, flat_steps, keys, desc=f"fit_grid {ns}x{nk}", checkpoints=checkpoints
    )

    def grid(m):
        m = jax.tree_util.tree_map(
            lambda a: a.reshape(ns, nk, *a.shape[1:]) if eqx.is_array(a) else a, m
        )
        return FittedGrid(m, steps, seeds)

    history = {
        "loss": losses.reshape(ns, nk, -1),
        "failed_at": failed_at.reshape(ns, nk),
        "wall_time": wall,
        "checkpoints": {k: grid(m) for k, m in snaps.items()},
    }
    return grid(models), history
