"""Training throughput: `mcm_prob.fit_grid` against a minimal hand-written JAX loop.

Standard workload: 2-d Gaussian data, CD with the Euler teacher and the exact score, MLP width
128 and depth 3 (SiLU), batch 256, Adam (lr 1e-3), float32. Both implementations vmap over
models and lax.scan over iterations; both are timed after a warm-up call that compiles them, so
the figures are steady-state model-iterations per second.

    python benchmarks/bench_training.py --models 16 --iterations 2000
    python benchmarks/bench_training.py --grid            # the 5 Delta x 8 seed grid, wall time
    python benchmarks/bench_training.py --models 64 --precision float32 tf32   # both, on a GPU

Both sides run at the same matmul precision (`--precision`: ``default`` is JAX's own, TF32-like
on a GPU; ``float32`` full float32 products; ``tf32`` TensorFloat-32), set with
`jax.default_matmul_precision` around each measurement.

Prints one line per measurement; results are recorded in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mcm_prob as mp

MEAN = np.array([1.0, -0.5])
COV = np.array([[1.0, 0.3], [0.3, 0.5]])
WIDTH, DEPTH, BATCH, LR, T, DELTA, N_FREQ = 128, 3, 256, 1e-3, 4.0, 0.01, 4
# --precision -> jax.default_matmul_precision (None: JAX's default)
PRECISIONS = {"default": None, "float32": "float32", "tf32": "tensorfloat32"}


def config(iterations: int) -> mp.TrainConfig:
    return mp.TrainConfig(
        method="cd",
        teacher="euler",
        iterations=iterations,
        chunk_size=iterations,
        width=WIDTH,
        depth=DEPTH,
        batch_size=BATCH,
        learning_rate=LR,
        T=T,
        delta=DELTA,
        ema_decay=0.0,
        progress=False,
    )


def minimal_loop(n_models: int, iterations: int, steps: np.ndarray):
    """The same computation written by hand: plain arrays, no package code."""
    lam, vecs = np.linalg.eigh(COV)
    chol = np.linalg.cholesky(COV)
    mean, lam, vecs, chol = (jnp.asarray(a, jnp.float32) for a in (MEAN, lam, vecs, chol))
    sizes = [2 + 2 * (1 + 2 * N_FREQ)] + [WIDTH] * DEPTH + [2]

    def init(key):
        params = []
        layers = zip(sizes[:-1], sizes[1:], strict=True)
        for k, (i, o) in zip(jax.random.split(key, len(sizes) - 1), layers, strict=True):
            kw, kb = jax.random.split(k)
            lim = 1 / math.sqrt(i)
            params.append(
                (
                    jax.random.uniform(kw, (o, i), jnp.float32, -lim, lim),
                    jax.random.uniform(kb, (o,), jnp.float32, -lim, lim),
                )
            )
        return params

    def feats(tau):
        c = 0.25 * jnp.log(jnp.sqrt(jnp.expm1(2 * tau)))
        f = 2.0 ** jnp.arange(N_FREQ, dtype=jnp.float32)
        return jnp.concatenate([c[None], jnp.sin(f * c), jnp.cos(f * c)])

    def f(params, x, t, s):
        h = jnp.concatenate([x, feats(t), feats(s)])
        for w, b in params[:-1]:
            h = jax.nn.silu(w @ h + b)
        w, b = params[-1]
        g = w @ h + b
        same = t == s
        ratio = jnp.where(same, 1.0, jnp.sqrt(-jnp.expm1(-2 * s) / -jnp.expm1(-2 * t)))
        return ratio * x + jnp.where(same, 0.0, jnp.exp(-s) - jnp.exp(-t) * ratio) * g

    def score(x, t):
        nu = jnp.exp(-2 * t) * lam - jnp.expm1(-2 * t)
        return -(((x - jnp.exp(-t) * mean) @ vecs) / nu) @ vecs.T

    opt = optax.adam(LR)

    def loss_fn(params, key, step):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        x0 = mean + jax.random.normal(k1, (BATCH, 2)) @ chol.T
        n_max = jnp.floor((T - DELTA) / step + 1e-9)
        n = jnp.clip(jnp.floor(jax.random.uniform(k3, (BATCH,)) * n_max) + 1, 1, n_max)
        m = jnp.floor(jax.random.uniform(k4, (BATCH,)) * n)
        t, tp, s = DELTA + n * step, DELTA + (n - 1) * step, DELTA + m * step
        z = jax.random.normal(k2, (BATCH, 2))
        xt = jnp.exp(-t)[:, None] * x0 + jnp.sqrt(-jnp.expm1(-2 * t))[:, None] * z
        v = -xt - jax.vmap(score)(xt, t)
        xp = xt - step * v
        pred = jax.vmap(f, (None, 0, 0, 0))(params, xt, t, s)
        tgt = jax.lax.stop_gradient(jax.vmap(f, (None, 0, 0, 0))(params, xp, tp, s))
        return jnp.mean(jnp.sum((pred - tgt) ** 2, -1))

    def train_one(key, step):
        params = init(key)

        def body(carry, it):
            params, opt_state = carry
            loss, g = jax.value_and_grad(loss_fn)(params, jax.random.fold_in(key, it), step)
            upd, opt_state = opt.update(g, opt_state, params)
            return (optax.apply_updates(params, upd), opt_state), loss

        return jax.lax.scan(body, (params, opt.init(params)), jnp.arange(iterations))

    run = jax.jit(jax.vmap(train_one))
    args = (jax.random.split(jax.random.key(0), n_models), jnp.asarray(steps, jnp.float32))
    return run, args


def timed(fn, repeats: int) -> float:
    fn()  # compile and warm up
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def throughput(n_models: int, iterations: int, repeats: int) -> dict:
    data = mp.data.Gaussian(MEAN, COV)
    steps = np.geomspace(0.05, 0.4, n_models)
    cfg = config(iterations)
    ours = timed(
        lambda: jax.block_until_ready(mp.fit_grid(data, cfg, steps=steps, seeds=[0])[0].models),
        repeats,
    )
    run, args = minimal_loop(n_models, iterations, steps)
    hand = timed(lambda: jax.block_until_ready(run(*args)), repeats)
    work = n_models * iterations
    return {
        "device": str(jax.devices()[0]),
        "models": n_models,
        "iterations": iterations,
        "fit_grid_model_it_per_s": round(work / ours, 1),
        "minimal_loop_model_it_per_s": round(work / hand, 1),
        "ratio": round(hand / ours, 3),
    }


def grid_wall_time(iterations: int) -> dict:
    data = mp.data.Gaussian(MEAN, COV)
    start = time.perf_counter()
    grid, hist = mp.fit_grid(
        data, config(iterations), steps=[0.025, 0.05, 0.1, 0.2, 0.4], seeds=list(range(8))
    )
    jax.block_until_ready(grid.models)
    return {
        "device": str(jax.devices()[0]),
        "grid": "5 steps x 8 seeds",
        "iterations": iterations,
        "wall_s_including_compile": round(time.perf_counter() - start, 1),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, nargs="+", default=[16])
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--grid", action="store_true", help="time the 5 x 8 grid instead")
    parser.add_argument("--precision", nargs="+", choices=list(PRECISIONS), default=["default"])
    args = parser.parse_args()
    for precision in args.precision:
        with jax.default_matmul_precision(PRECISIONS[precision]):
            if args.grid:
                print(json.dumps(grid_wall_time(args.iterations) | {"precision": precision}))
                continue
            for m in args.models:
                row = throughput(m, args.iterations, args.repeats) | {"precision": precision}
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
