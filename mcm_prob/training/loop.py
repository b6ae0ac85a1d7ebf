r"""The training loop shared by every objective: `fit`, `fit_grid` and their results.

Every model of a grid of $(\Delta, \text{seed})$ pairs is trained in one `jax.jit`-compiled
program: `jax.vmap` over models (sharded over every local device), `lax.scan` over
iterations, chunked for a progress bar. Each iteration: the objective's per-example loss
(`AbstractObjective.loss`) of the online network against the target network (stop-gradient
online weights, or their EMA), averaged; Adam (optax) on the network and the objective's own
inexact arrays (sCM's weighting); the EMA of the evaluation weights. A non-finite loss freezes
that model (its later losses are NaN) and records the iteration; `fit` then raises,
`fit_grid` marks the model as failed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jaxtyping import Array, ArrayLike

from .. import _checks
from .._checks import integer, number, prng_key
from ..data import DataDistribution, check_data, rebuild
from ..flow import AbstractFlowMap
from ..networks import AbstractSkipNet
from ..progress import progress_bar
from .config import FitConfig, TrainConfig
from .consistency import grid_batch, grid_indices
from .objective import AbstractObjective, Context

__all__ = [
    "fit",
    "fit_grid",
    "FittedGrid",
    "TrainedModel",
    "TrainingDiverged",
    "TrainState",
    "training_set",
    "training_batch",
    "time_indices",
]


class TrainingDiverged(FloatingPointError):
    """A model's loss became NaN/inf during training. `.iteration` is where, `.history` holds
    the losses up to then (NaN afterwards), so nothing computed is lost."""

    def __init__(self, message: str, *, iteration: int = -1, history: dict | None = None):
        super().__init__(message)
        self.iteration, self.history = iteration, history


class TrainState(NamedTuple):
    """The loop's state, per model (leading model axis under `fit_grid`)."""

    params: Any  # (network params, objective params): what the optimiser updates
    opt_state: Any
    ema: Any  # EMA of the network params (the evaluation weights)
    target: Any  # EMA target of the network params (used when target_decay > 0)
    failed: Array  # the loss became non-finite (bool)
    failed_at: Array  # at which iteration (-1: never)


def _context(data, settings: FitConfig, step, iteration, pool) -> Context:
    return Context(
        data, settings.path, settings.T, settings.delta, step, iteration, settings.batch_size, pool
    )


def time_indices(key, cfg: TrainConfig, step, n_max, shape):
    """Grid indices n in {1..N} (N = n_max, possibly traced) drawn as the `TrainConfig`
    `cfg.time_sampling` says (`mcm_prob.training.consistency.grid_indices`)."""
    return grid_indices(
        key,
        step,
        n_max,
        shape,
        delta=cfg.delta,
        sampling=cfg.time_sampling,
        loc=cfg.lognormal_loc,
        scale=cfg.lognormal_scale,
    )


def training_set(data: DataDistribution, config, key: jax.Array) -> jax.Array:
    """The fixed training set, shape (config.train_size, dim), of the model whose seed key is
    `key` (the key `fit` takes; `fit_grid` uses `jax.random.key(seed)`); `config` a
    `TrainConfig` or `FitConfig`."""
    if config.train_size is None:
        raise ValueError("`config.train_size` is None: training draws fresh data every iteration")
    return data.sample(jax.random.fold_in(prng_key("key", key), 0x7261696E), config.train_size)


@eqx.filter_jit
def _training_sets(data: DataDistribution, cfg, keys: jax.Array) -> jax.Array:
    """`training_set` of every model key, (n_models, train_size, dim), as one compiled program."""
    return jax.vmap(lambda k: training_set(data, cfg, k))(keys)


def training_batch(data: DataDistribution, cfg: TrainConfig, step, key, pool=None):
    """One CD/CT batch of `cfg.batch_size` examples at step Delta = `step`: (x_t, t,
    x_hat_{t-Delta}, t - Delta, s) on `cfg.path` (`mcm_prob.training.consistency.grid_batch`);
    x_0 from `pool` (n, d) with replacement when given, else fresh draws. Jit-traceable."""
    ctx = _context(data, cfg.fit_config(), step, 0, pool)
    return grid_batch(
        key,
        ctx,
        teacher=None if cfg.method == "ct" else cfg.teacher,
        sampling=cfg.time_sampling,
        loc=cfg.lognormal_loc,
        scale=cfg.lognormal_scale,
        rtol=cfg.teacher_rtol,
        atol=cfg.teacher_atol,
    )


def _ema(decay, avg, new):
    return jax.tree_util.tree_map(lambda a, p: decay * a + (1 - decay) * p, avg, new)


@eqx.filter_jit
def _run_chunk(state: TrainState, data, static, objective, cfg: FitConfig, steps, keys, pools, its):
    """Advance every model by len(its) iterations: vmap over models, lax.scan over iterations.
    `static` and `objective` are the non-array parts of the network and the objective."""
    opt = cfg.optimizer.build(cfg.iterations)

    def loss_fn(params, target_params, key, ctx):
        net, obj = params
        model = eqx.combine(net, static)
        target = eqx.combine(jax.lax.stop_gradient(target_params), static)
        return jnp.mean(eqx.combine(obj, objective).loss(model, target, key, ctx))

    def per_model(st, step, key, pool):
        def body(st: TrainState, it):
            ctx = _context(data, cfg, step, it, pool)
            tgt_params = st.params[0] if cfg.target_decay == 0 else st.target
            loss, grads = jax.value_and_grad(loss_fn)(
                st.params, tgt_params, jax.random.fold_in(key, it), ctx
            )
            ok = jnp.isfinite(loss) & ~st.failed
            updates, opt_state = opt.update(grads, st.opt_state, st.params)
            # a failed model keeps its weights for good (its optimiser state is then unused);
            # non-finite gradients make the next loss non-finite and are caught there. Masking
            # the update (not selecting between old and new weights) keeps the update in place.
            updates = jax.tree_util.tree_map(lambda u: jnp.where(ok, u, 0), updates)
            params = optax.apply_updates(st.params, updates)
            ema, target = st.ema, st.target
            if cfg.ema_decay > 0:  # static switches: no work when unused
                ema = _ema(jnp.minimum(cfg.ema_decay, (1.0 + it) / (10.0 + it)), ema, params[0])
            if cfg.target_decay > 0:
                target = _ema(cfg.target_decay, target, params[0])
            failed_at = jnp.where(~ok & ~st.failed, it, st.failed_at)
            recorded = jnp.where(st.failed, jnp.nan, loss)
            return TrainState(params, opt_state, ema, target, st.failed | ~ok, failed_at), recorded

        return jax.lax.scan(body, st, its)

    return jax.vmap(per_model)(state, steps, keys, pools)


def _check_data(data: DataDistribution, cfg: FitConfig) -> None:
    check_data("data", data)
    if data.regime == "nonsmooth" and cfg.delta <= 0:
        raise ValueError(
            f"{type(data).__name__} is non-smooth: `delta` must be > 0 (early stopping), got {cfg.delta}"
        )
    if cfg.network.dtype == "float64" and not jax.config.jax_enable_x64:
        raise ValueError('`dtype="float64"` needs jax.config.update("jax_enable_x64", True) first')


def _init(dim: int, cfg: FitConfig, objective: AbstractObjective, keys: jax.Array):
    """Initial training state of len(keys) models; returns (state, the network's static part,
    the objective's static part, the per-model training keys). The networks' weights are one
    compiled program per network, path and model count (`_init_networks`), shared by every
    objective and loop setting; the rest of the state is a small program of its own."""
    params, static, train_keys = _init_networks(dim, cfg.network, cfg.path, keys)
    obj_params, obj_static = eqx.partition(objective, eqx.is_inexact_array)
    state = _start_state(cfg.optimizer, cfg.iterations, params, obj_params)
    return state, static, obj_static, train_keys


@eqx.filter_jit
def _init_networks(dim: int, network, path, keys: jax.Array):
    """The initial weights of len(keys) networks (inexact arrays, stacked on a leading model
    axis), the networks' static part and the per-model training keys."""
    init_keys, train_keys = jax.vmap(jax.random.split, out_axes=1)(keys)
    make = lambda k: network.build(dim, path, k)  # noqa: E731
    params, static = eqx.partition(eqx.filter_vmap(make)(init_keys), eqx.is_inexact_array)
    return params, static, train_keys


@eqx.filter_jit
def _start_state(optimizer, iterations: int, params, obj_params) -> TrainState:
    """The `TrainState` of fresh networks `params` (leading model axis of m) and the
    objective's parameters `obj_params` (copied to every model): the optimiser's initial
    state, EMA and target equal to the weights, no model failed."""
    m = jax.tree_util.tree_leaves(params)[0].shape[0]
    obj_params = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (m, *a.shape)), obj_params)
    opt_state = jax.vmap(optimizer.build(iterations).init)((params, obj_params))
    failed, failed_at = jnp.zeros(m, bool), jnp.full(m, -1, jnp.int32)
    return TrainState((params, obj_params), opt_state, params, params, failed, failed_at)


def _spread(steps: np.ndarray, keys: jax.Array):
    """Pad the model axis to a multiple of the device count (repeating the last model) and
    return `place`, which shards a pytree's leading model axis over every device of every
    process (a 1-d mesh ``"models"`` over `jax.devices()`); with one device nothing is
    padded or moved. Models never interact, so the partitioned program computes the
    single-device models, up to round-off (XLA may vectorise another number of models per
    device differently). With several processes every process passes the same host values
    and `place` builds the global arrays from them (`gather` brings results back)."""
    devices = jax.devices()
    if len(devices) == 1:
        return steps, keys, lambda tree: tree
    pad = -len(steps) % len(devices)
    if pad:
        steps = np.concatenate([steps, np.repeat(steps[-1:], pad)])
        keys = jnp.concatenate([keys, jnp.repeat(keys[-1:], pad)])
    mesh = jax.sharding.Mesh(np.array(devices), ("models",))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("models"))
    several = jax.process_count() > 1

    def put(a):
        if not several or not getattr(a, "is_fully_addressable", True):  # already global
            return jax.device_put(a, rows)
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):  # keys travel as their data
            return jax.random.wrap_key_data(
                put(jax.random.key_data(a)), impl=jax.random.key_impl(a)
            )
        return jax.device_put(np.asarray(a), rows)  # the same host values on every process

    def place(tree):
        return jax.tree_util.tree_map(lambda a: put(a) if eqx.is_array(a) and a.ndim else a, tree)

    return steps, place(keys), place


def _first(tree, n: int):
    """The first n models of a stacked pytree (drops the padding of `_spread`)."""
    return jax.tree_util.tree_map(lambda a: a[:n] if eqx.is_array(a) and a.ndim else a, tree)


def gather(tree):
    """A pytree's arrays as arrays of this process (a multi-process run's sharded results
    gathered from every process; unchanged otherwise)."""
    if jax.process_count() == 1:
        return tree

    def one(a):
        if not eqx.is_array(a) or a.is_fully_addressable:
            return a
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(
                one(jax.random.key_data(a)), impl=jax.random.key_impl(a)
            )
        return jnp.asarray(multihost_utils.process_allgather(a, tiled=True))

    return jax.tree_util.tree_map(one, tree)


def _train(
    data, objective, cfg: FitConfig, steps: np.ndarray, keys: jax.Array, desc: str, checkpoints=()
):
    """Train len(steps) models (one per (Delta, key)); returns (models, losses, failed_at,
    wall, snapshots, objectives) with `snapshots` the evaluation weights after each of
    `checkpoints` and `objectives` the trained objectives (stacked)."""
    start = time.perf_counter()
    # fields that do not change the compiled program are normalised, so that fits differing
    # only in Delta (a traced argument), chunking or progress display share one compilation
    run_cfg = dataclasses.replace(cfg, chunk_size=1, progress=False)
    n_models = len(steps)
    steps, keys, place = _spread(np.asarray(steps), keys)
    state, static, obj_static, train_keys = _init(data.dim, run_cfg, objective, keys)
    state = place(state)
    pools = None
    if cfg.train_size is not None:
        pools = place(_training_sets(data, run_cfg, keys))
    steps_arr = place(jnp.asarray(steps, dtype=jnp.result_type(float)))
    losses, snapshots = [], {}
    n_chunks = math.ceil(cfg.iterations / cfg.chunk_size)
    bounds = np.linspace(0, cfg.iterations, n_chunks + 1).round().astype(int)
    bounds = np.unique(np.concatenate([bounds, np.asarray(checkpoints, int)]))

    def evaluation(st):
        chosen = st.ema if cfg.ema_decay > 0 else st.params[0]
        return _first(eqx.combine(gather(chosen), static), n_models)

    timed = []  # (seconds, iterations) of the chunks after the first (compiled by then)
    with progress_bar(cfg.iterations, desc, enabled=cfg.progress, leave=False) as bar:
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            its = jnp.arange(lo, hi, dtype=jnp.int32)
            tick = time.perf_counter()
            state, chunk_loss = _run_chunk(
                state, data, static, obj_static, run_cfg, steps_arr, train_keys, pools, its
            )
            chunk_loss = np.asarray(gather(chunk_loss))
            if lo > 0 and hi - lo == bounds[1] - bounds[0]:  # same length: no new compilation
                timed.append((time.perf_counter() - tick, hi - lo))
            losses.append(chunk_loss)
            if hi in checkpoints:
                snapshots[int(hi)] = evaluation(state)
            bar.update(int(hi - lo))
            last = chunk_loss[:, -1]
            if np.any(np.isfinite(last)):
                bar.set_postfix(loss=f"{np.nanmean(last):.3g}")
    objectives = _first(eqx.combine(gather(state.params[1]), obj_static), n_models)
    per_iteration = np.nan
    if timed:  # steady state, per model (the models run together, padding included)
        seconds, count = np.sum(timed, axis=0)
        per_iteration = seconds / count / len(steps)
    return (
        evaluation(state),
        np.concatenate(losses, axis=1)[:n_models],
        np.asarray(gather(state.failed_at))[:n_models],
        time.perf_counter() - start,
        snapshots,
        objectives,
        per_iteration,
    )


def _resolve(data, objective, settings, what: str):
    """(objective, FitConfig) from a `TrainConfig` or an objective with its settings."""
    if isinstance(objective, TrainConfig):
        if settings is not None:
            raise ValueError(
                f"`settings` is for objectives; a TrainConfig carries its own (got {settings!r})"
            )
        objective, settings = objective.objective(), objective.fit_config()
    elif isinstance(objective, AbstractObjective):
        settings = FitConfig() if settings is None else settings
        if not isinstance(settings, FitConfig):
            raise TypeError(f"`settings` must be a FitConfig, got {type(settings).__name__}")
    else:
        raise TypeError(
            f"`{what}` must be a TrainConfig or an objective (a mcm_prob.training."
            f"AbstractObjective), got {type(objective).__name__}"
        )
    _check_data(data, settings)
    return objective, settings


def _steps(objective, settings: FitConfig, steps) -> tuple[float, ...]:
    """The validated Delta values: > 0 on a grid with >= 1 interval, or (0.0,) for a
    continuous-time objective (which takes none)."""
    if not objective.has_step:
        if steps is not None and any(float(v) != 0 for v in np.atleast_1d(steps)):
            raise ValueError(
                f"{type(objective).__name__} is a continuous-time objective: it has no "
                f"discretization step; leave `steps` out (or [0]), got {steps!r}"
            )
        return (0.0,)
    if steps is None:
        raise ValueError(f"{type(objective).__name__} has a discretization step: pass `step(s)`")
    steps = tuple(number("steps", v, gt=0) for v in np.atleast_1d(np.asarray(steps, dtype=float)))
    if not steps:
        raise ValueError("`steps` must be non-empty")
    for v in steps:
        settings.grid_size(v)
    return steps


def fit(data: DataDistribution, objective, key: jax.Array, *, step=None, settings=None):
    """Fit one two-time map f(x, t, s) to `data` by `objective`.

    **Arguments:** `objective`: a `TrainConfig` (CD or CT with every setting in one object;
    then `step` and `settings` come from it) or any `mcm_prob.training.AbstractObjective`,
    with `settings` a `FitConfig` (default `FitConfig()`) and `step` its Delta if it has one
    (continuous-time objectives take none). `key`: the model's seed key.

    **Returns:** `(model, history)`: the fitted net (EMA weights when `ema_decay > 0`) and a
    dict with ``"loss"`` (shape (iterations,)), ``"wall_time"`` (seconds) and ``"objective"``
    (the objective with its trained arrays, e.g. sCM's weighting). Raises `TrainingDiverged`
    naming the iteration if the loss becomes non-finite.
    """
    config = objective
    objective, settings = _resolve(data, objective, settings, "objective")
    if isinstance(config, TrainConfig):
        step = config.step
    (step,) = _steps(objective, settings, step)
    key = prng_key("key", key)
    models, losses, failed_at, wall, _, objectives, _ = _train(
        data, objective, settings, np.array([step]), jnp.stack([key]), desc=f"fit step={step}"
    )
    history = {"loss": losses[0], "wall_time": wall}
    if failed_at[0] >= 0:
        what = config.to_json() if isinstance(config, TrainConfig) else repr(objective)
        raise TrainingDiverged(
            f"training diverged: non-finite loss at iteration {int(failed_at[0])} "
            f"with config {what}; lower `learning_rate`, set `grad_clip`, or check the data",
            iteration=int(failed_at[0]),
            history=history,
        )
    first = lambda tree: jax.tree_util.tree_map(lambda a: a[0] if eqx.is_array(a) else a, tree)  # noqa: E731
    return first(models), history | {"objective": first(objectives)}


def _check_grid_size(ns: int, nk: int, dim: int, settings) -> None:
    """The resource guard on a grid's models, all trained in one program: per model its
    parameters, gradients, two Adam moments and an EMA copy, and a batch's activations
    (forward, backward and a tangent pass), in the network's dtype."""
    net = settings.network
    inputs = dim + 2 * (1 + 2 * net.n_freq)
    params = (inputs + 1) * net.width + max(net.depth - 1, 0) * (net.width + 1) * net.width
    params += (net.width + 1) * dim
    activations = settings.batch_size * (inputs + net.width * max(net.depth, 1) + dim)
    _checks.check_size(
        "steps` x `seeds",
        ns * nk * np.dtype(net.dtype).itemsize * (5 * params + 3 * activations),
        f"{ns * nk:,} models ({ns} steps x {nk} seeds) of {params:,} parameters",
    )


class TrainedModel(eqx.Module):
    """A fitted consistency function with what it was trained on: the network, its
    `TrainConfig` and (optionally) the data spec, as `mcm_prob.load_model` returns it.

    Calls like the network, `f(x, t, s)`. `trained_range` = (delta, T) is the time range of its
    training grid; `mcm_prob.sample` refuses a schedule that leaves it (``extrapolate=True``
    runs it anyway, with a warning).
    """

    net: AbstractSkipNet
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
        """The training data rebuilt from what was stored (`mcm_prob.data.rebuild`: a spec, or a
        user family's class and arrays); None when nothing was stored. A user family whose
        class is not defined in this process raises `ValueError` saying so."""
        return None if self.data_spec is None else rebuild(json.loads(self.data_spec))

    def __call__(self, x: ArrayLike, t: ArrayLike, s: ArrayLike) -> Array:
        return self.net(x, t, s)


class FittedGrid(eqx.Module):
    """Models fitted on a (Delta, seed) grid; leaves carry leading axes (n_steps, n_seeds).

    `grid[i, j]` is the net of `steps[i]` and `seeds[j]`; `grid(x, t, s)` evaluates
    every model on the same x and returns shape (n_steps, n_seeds, *x.shape).
    """

    models: AbstractFlowMap
    steps: tuple[float, ...] = eqx.field(static=True)
    seeds: tuple[int, ...] = eqx.field(static=True)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.steps), len(self.seeds)

    @property
    def path(self):
        """The Gaussian path the models were trained on."""
        return self.models.path

    def __getitem__(self, index: tuple[int, int]) -> AbstractFlowMap:
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
    data: DataDistribution,
    objective,
    *,
    steps=None,
    seeds,
    checkpoints=(),
    settings=None,
) -> tuple[FittedGrid, dict]:
    """Fit one model per (Delta, seed) pair as a single compiled program.

    `objective`: a `TrainConfig` or an objective with `settings` (as in `fit`). `steps`: the
    Delta values (overriding `config.step`); continuous-time objectives take none and give one
    row at Delta = 0. `seeds`: integer seeds, model (i, j) uses `jax.random.key(seeds[j])`, so
    `fit` with `steps[i]` and `jax.random.key(seeds[j])` gives the same model (to float tolerance).

    **Returns:** `(grid, history)` with `history["loss"]` of shape (n_steps, n_seeds, iterations),
    `history["failed_at"]` (n_steps, n_seeds: the iteration at which a model's loss became
    non-finite and its training stopped, or -1), `history["wall_time"]` and
    `history["objective"]` (the trained objectives, leading axis over models) and
    `history["seconds_per_iteration"]` (steady-state training time per iteration and model:
    chunks after the first of the same length, so no compilation; NaN with one chunk).

    `checkpoints`: iterations (1..iterations) after which the evaluation weights are also
    kept, as `history["checkpoints"][iteration]` (a `FittedGrid`). With a constant learning
    rate (the default) a checkpoint at k is the model of a k-iteration fit: the optimiser,
    EMA warm-up and data stream do not depend on the total.
    """
    objective, settings = _resolve(data, objective, settings, "objective")
    checkpoints = tuple(
        sorted({integer("checkpoints", c, ge=1) for c in np.atleast_1d(checkpoints).tolist()})
    )
    if checkpoints and checkpoints[-1] > settings.iterations:
        raise ValueError(
            f"`checkpoints` must lie in 1..iterations = {settings.iterations}, got {list(checkpoints)}"
        )
    steps = _steps(objective, settings, steps)
    seeds = _checks.seeds("seeds", np.atleast_1d(seeds).tolist(), capped=False)
    ns, nk = len(steps), len(seeds)
    _check_grid_size(ns, nk, data.dim, settings)
    flat_steps = np.repeat(np.array(steps), nk)
    keys = jax.vmap(jax.random.key)(jnp.tile(jnp.asarray(seeds, jnp.uint32), ns))
    models, losses, failed_at, wall, snaps, objectives, per_iteration = _train(
        data,
        objective,
        settings,
        flat_steps,
        keys,
        desc=f"fit_grid {ns}x{nk}",
        checkpoints=checkpoints,
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
        "objective": objectives,
        "seconds_per_iteration": per_iteration,
    }
    return grid(models), history
