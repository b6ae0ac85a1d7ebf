"""`mcm_prob.fit_grid` against honest PyTorch versions of the same training, in one process.

Standard workload (as in bench_training.py): 2-d Gaussian data, consistency distillation with
the Euler teacher and the exact score, MLP 20 -> 128 -> 128 -> 128 -> 2 (SiLU), batch 256, Adam
(lr 1e-3), float32, no EMA; each model has its own Delta. Per model-iteration the matrix
products cost 4 x 2 x 256 x 35,584 = 72.9 MFLOP (forward of the prediction, forward of the
stop-gradient target, backward of the prediction at twice its forward), the figure behind the
achieved FLOP/s below; element-wise work (SiLU, time features, the score) comes on top.

PyTorch variants, all on the same arithmetic:

* ``torch-loop``: one `nn.Module` and one `torch.optim.Adam` per model, a Python loop over them;
* ``torch-vmap``: `torch.func.stack_module_state` + `functional_call` vmapped over the stacked
  weights, one Adam over the stacks (per-element Adam equals per-model Adam); `foreach` (CPU)
  or `fused` (CUDA) Adam;
* ``torch-compile``: that step under `torch.compile` (default mode: Inductor's fused kernels);
* ``torch-cudagraphs``: `torch.compile(mode="reduce-overhead")`, which captures CUDA graphs (CUDA
  only).

**Matched precision.** Both libraries run the float32 matrix products the same way, once per
`--precision`: ``float32`` (full float32 products: JAX
``jax.default_matmul_precision("float32")``, PyTorch ``set_float32_matmul_precision("highest")``
with TF32 off) and ``tf32`` (TensorFloat-32 products on GPUs that have them: JAX
``"tensorfloat32"``, PyTorch ``"high"`` with TF32 on). JAX's own default on a GPU is TF32-like
and PyTorch's is full float32, so a comparison at the two defaults compares different
arithmetic. Each side's FLOP/s is a fraction of its own 4096^2 matmul at the same precision.
On a CPU both settings are full float32.

On a CPU, JAX gets one XLA device per core (`mcm_prob.devices`; the grid is sharded over them)
and PyTorch its default intra-op threads over the same cores. Every side is timed after warm-up
iterations that compile it (best of `--repeats`); JAX runs the
`iterations` inside one `lax.scan`, PyTorch as a Python loop of steps (its idiom). A large
matrix product (4096^2 float32) is timed in the same process by each library at the same precision; the
FLOP/s of each side is reported as a fraction of its own library's.

    python benchmarks/bench_pytorch.py --models 1 4 16 64 --iterations 200
    python benchmarks/bench_pytorch.py --models 64 256 --iterations 200 --precision float32 tf32  # GPU

Prints one JSON line per (models, side); results are recorded in benchmarks/README.md.
PyTorch is an optional extra (``pip install -e ".[torch]"``), never a test dependency.
"""

from __future__ import annotations

import argparse
import json

from mcm_prob.devices import use_every_cpu_core

use_every_cpu_core()  # on a CPU: one XLA device per core, as the mcm-prob command does
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from bench_training import (  # noqa: E402  (the standard workload, one definition)
    BATCH,
    COV,
    DELTA,
    DEPTH,
    LR,
    MEAN,
    N_FREQ,
    WIDTH,
    T,
    config,
    timed,
)

import mcm_prob as mp  # noqa: E402

N_IN = 2 + 2 * (1 + 2 * N_FREQ)
MACS = N_IN * WIDTH + (DEPTH - 1) * WIDTH * WIDTH + WIDTH * 2  # per sample, forward
FLOP_PER_MODEL_IT = 4 * 2 * BATCH * MACS


def jax_side(n_models: int, iterations: int, repeats: int) -> float:
    """Seconds for `iterations` of an n-model `fit_grid` (after a compiling call)."""
    data, cfg = mp.data.Gaussian(MEAN, COV), config(iterations)
    steps = np.geomspace(0.05, 0.4, n_models)

    def run():
        jax.block_until_ready(mp.fit_grid(data, cfg, steps=steps, seeds=[0])[0].models)

    return timed(run, repeats)


def jax_matmul_flops() -> float:
    """FLOP/s of a 4096^2 float32 matmul at the current default matmul precision."""
    a = jax.random.normal(jax.random.key(0), (4096, 4096), jnp.float32)
    f = jax.jit(jnp.matmul)
    return 2 * 4096**3 / timed(lambda: f(a, a).block_until_ready(), 3)


# --precision -> (JAX default_matmul_precision, torch float32 matmul precision, TF32 allowed)
PRECISIONS = {"float32": ("float32", "highest", False), "tf32": ("tensorfloat32", "high", True)}


# ------------------------------------------------------------------ PyTorch
def torch_sides(
    n_models: int, iterations: int, repeats: int, variants, precision: str
) -> dict[str, float]:
    import copy

    import torch
    from torch import nn
    from torch.func import functional_call, grad_and_value, stack_module_state, vmap

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _, torch_precision, tf32 = PRECISIONS[precision]
    torch.set_float32_matmul_precision(torch_precision)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    f32 = dict(device=dev, dtype=torch.float32)
    mean, chol = (torch.tensor(a, **f32) for a in (MEAN, np.linalg.cholesky(COV)))
    lam, vecs = (torch.tensor(a, **f32) for a in np.linalg.eigh(COV))
    freqs = 2.0 ** torch.arange(N_FREQ, **f32)

    def feats(tau):  # (B,) -> (B, 1 + 2 N_FREQ), as mcm_prob.networks
        c = 0.25 * torch.log(torch.sqrt(torch.expm1(2 * tau)))[:, None]
        return torch.cat([c, torch.sin(freqs * c), torch.cos(freqs * c)], -1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            sizes = [N_IN] + [WIDTH] * DEPTH + [2]
            self.layers = nn.ModuleList(
                nn.Linear(i, o, **f32) for i, o in zip(sizes[:-1], sizes[1:], strict=True)
            )

        def forward(self, x, t, s):  # x (B, 2), t, s (B,)
            h = torch.cat([x, feats(t), feats(s)], -1)
            for layer in self.layers[:-1]:
                h = nn.functional.silu(layer(h))
            g = self.layers[-1](h)
            same = t == s
            ratio = torch.where(same, 1.0, torch.sqrt(torch.expm1(-2 * s) / torch.expm1(-2 * t)))
            out = torch.where(same, 0.0, torch.exp(-s) - torch.exp(-t) * ratio)
            return ratio[:, None] * x + out[:, None] * g

    def batch(step, gen_shape=()):  # one CD batch with the Euler teacher and the exact score
        x0 = mean + torch.randn(*gen_shape, BATCH, 2, **f32) @ chol.T
        step = step.reshape(*gen_shape, 1)
        n_max = torch.floor((T - DELTA) / step + 1e-9)
        n = torch.minimum(torch.floor(torch.rand(*gen_shape, BATCH, **f32) * n_max) + 1, n_max)
        m = torch.floor(torch.rand(*gen_shape, BATCH, **f32) * n)
        t, tp, s = DELTA + n * step, DELTA + (n - 1) * step, DELTA + m * step
        xt = torch.exp(-t)[..., None] * x0 + torch.sqrt(-torch.expm1(-2 * t))[..., None] * (
            torch.randn(*gen_shape, BATCH, 2, **f32)
        )
        nu = torch.exp(-2 * t)[..., None] * lam - torch.expm1(-2 * t)[..., None]
        score = -(((xt - torch.exp(-t)[..., None] * mean) @ vecs) / nu) @ vecs.T
        xp = xt + step[..., None] * (xt + score) * 1.0  # x - Delta v, v = -x - score
        return xt, t, xp, tp, s

    steps = torch.tensor(np.geomspace(0.05, 0.4, n_models), **f32)
    nets = [Net() for _ in range(n_models)]
    out = {}

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def time_steps(step_fn):
        def run():
            for _ in range(iterations):
                step_fn()
            sync()

        return timed(run, repeats)

    if "torch-loop" in variants:
        opts = [torch.optim.Adam(m.parameters(), lr=LR) for m in nets]

        def loop_step():
            for k, (net, opt) in enumerate(zip(nets, opts, strict=True)):
                xt, t, xp, tp, s = batch(steps[k])
                with torch.no_grad():
                    tgt = net(xp, tp, s)
                loss = ((net(xt, t, s) - tgt) ** 2).sum(-1).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

        out["torch-loop"] = time_steps(loop_step)

    params, buffers = stack_module_state([copy.deepcopy(m) for m in nets])
    base = copy.deepcopy(nets[0]).to("meta")

    def loss_one(p, b, xt, t, xp, tp, s):
        tgt = functional_call(base, (p, b), (xp, tp, s)).detach()
        return ((functional_call(base, (p, b), (xt, t, s)) - tgt) ** 2).sum(-1).mean()

    grads_of = vmap(grad_and_value(loss_one))
    adam_kw = {"fused": True} if dev.type == "cuda" else {"foreach": True}
    opt = torch.optim.Adam(list(params.values()), lr=LR, **adam_kw)
    keys = list(params)

    def vmap_step():
        g, _ = grads_of(params, buffers, *batch(steps, (n_models,)))
        for k in keys:
            params[k].grad = g[k]
        opt.step()

    if "torch-vmap" in variants:
        out["torch-vmap"] = time_steps(vmap_step)
    modes = {"torch-compile": "default"}
    if dev.type == "cuda":
        modes["torch-cudagraphs"] = "reduce-overhead"
    for name, mode in modes.items():
        if name not in variants:
            continue
        grads_c = torch.compile(grads_of, mode=mode)

        @torch.compile(mode=mode)
        def adam_c():
            opt.step()

        def compiled_step(grads_c=grads_c, adam_c=adam_c):
            g, _ = grads_c(params, buffers, *batch(steps, (n_models,)))
            for k in keys:
                params[k].grad = g[k]
            adam_c()

        try:
            out[name] = time_steps(compiled_step)
        except Exception as err:  # noqa: BLE001 - report, do not hide, a variant that fails
            out[name] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
    a = torch.randn(4096, 4096, **f32)
    sec = timed(lambda: (a @ a, sync()), 3)
    out["matmul_flops"] = 2 * 4096**3 / sec
    out["torch"] = torch.__version__
    out["device"] = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["torch-loop", "torch-vmap", "torch-compile", "torch-cudagraphs"],
    )
    parser.add_argument(
        "--loop-max", type=int, default=64, help="skip torch-loop above this many models"
    )
    parser.add_argument(
        "--precision", nargs="+", choices=list(PRECISIONS), default=["float32", "tf32"]
    )
    args = parser.parse_args()
    for precision in args.precision:
        with jax.default_matmul_precision(PRECISIONS[precision][0]):
            compare(args, precision)


def compare(args, precision: str) -> None:
    """Every side at `precision` (JAX's default matmul precision is set by the caller)."""
    jax_peak = jax_matmul_flops()
    head = {"precision": precision, "jax": jax.__version__}
    print(json.dumps(head | {"jax_matmul_tflops": round(jax_peak / 1e12, 3)}))
    for m in args.models:
        work = m * args.iterations
        sec = jax_side(m, args.iterations, args.repeats)
        rows = {"fit_grid": sec}
        variants = [v for v in args.variants if v != "torch-loop" or m <= args.loop_max]
        extra = torch_sides(m, args.iterations, args.repeats, variants, precision)
        torch_peak = extra.pop("matmul_flops")
        info = {k: extra.pop(k) for k in ("torch", "device")}
        rows |= extra
        for side, value in rows.items():
            line = {"precision": precision, "models": m, "side": side}
            line |= {"device": str(jax.devices()[0])} | info
            if isinstance(value, str):
                line["error"] = value
            else:
                rate = work / value
                peak = jax_peak if side == "fit_grid" else torch_peak
                line |= {
                    "model_it_per_s": round(rate, 1),
                    "fit_grid_speedup": round(value / sec, 2),
                    "tflops": round(rate * FLOP_PER_MODEL_IT / 1e12, 4),
                    "fraction_of_matmul": round(rate * FLOP_PER_MODEL_IT / peak, 4),
                }
            print(json.dumps(line), flush=True)
    print(json.dumps(head | {"torch_matmul_tflops": round(torch_peak / 1e12, 3)}))


if __name__ == "__main__":
    main()
