"""Micro-benchmark: every ResNet convolution shape, each pass, XLA vs matrix-product forms.

    python -m benchmarks.conv_micro --model resnet18 --size 64 --batch 32 [--torch] [--rounds 5]

For each distinct convolution of the model (input shape, kernel, stride, padding) it times
the forward pass, the input gradient and the kernel gradient, for each formulation of
`jaxsft.cpu.conv` ("xla": lax.conv_general_dilated; "gemm": taps + matrix product; for the
kernel gradient also "xla-stored": XLA's convolution on operands transposed from storage; for
the forward pass and stride-1 input gradients also "onednn", jaxsft.cpu.onednn) in float32
and, with --torch, PyTorch's conv2d (channels_last) with autograd. Rounds alternate between the
candidates so that load from other processes hits them alike; medians and spread are
reported, with the choice `choose_algorithms` makes. Timings only: nothing here is a test.
"""

from __future__ import annotations

import argparse
import collections
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxsft import cpu
from jaxsft.cpu import onednn
from jaxsft.cpu.conv import (
    GEMM,
    ONEDNN,
    XLA,
    XLA_STORED,
    Algorithms,
    choose_algorithms,
    conv2d,
)
from jaxsft.models import create_model

PASSES = ("forward", "input_grad", "kernel_grad")


def formulations(which: str, groups: int, strides: tuple[int, int]) -> tuple[str, ...]:
    """The formulations of `jaxsft.cpu.conv` that can compute this pass (float32)."""
    if groups != 1:
        return XLA, GEMM
    if which == "kernel_grad":
        return XLA, GEMM, XLA_STORED
    if onednn.available(jnp.float32) and (which == "forward" or strides == (1, 1)):
        return XLA, GEMM, ONEDNN
    return XLA, GEMM


def conv_shapes(model_name: str, size: int, batch: int) -> list[tuple]:
    """Distinct (x_shape, kernel_shape, strides, padding, groups) of the model's convolutions,
    with how many times each occurs."""
    model = create_model(model_name)
    found: collections.Counter = collections.Counter()

    def record(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and type(module).__name__ == "Conv":
            x = args[0]
            k = tuple(module.kernel_size)
            key = (tuple(x.shape), (*k, x.shape[-1] // module.feature_group_count,
                                    module.features),
                   tuple(module.strides), tuple(tuple(p) for p in module.padding),
                   module.feature_group_count)
            found[key] += 1
        return next_fun(*args, **kwargs)

    x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
    return [(*key, n) for key, n in found.items()]


def jax_pass(shape: tuple, algorithm: str, which: str) -> Callable[[], jax.Array]:
    """A zero-argument callable running one pass of one formulation (compiled once)."""
    x_shape, k_shape, strides, padding, groups = shape
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    k = jnp.asarray(rng.standard_normal(k_shape) * 0.05, jnp.float32)
    # XLA_STORED and ONEDNN compute some passes only; XLA computes the others.
    if algorithm in (XLA_STORED, ONEDNN):
        alg = Algorithms(*(algorithm if pass_ == which else XLA for pass_ in PASSES))
    else:
        alg = Algorithms(algorithm, algorithm, algorithm)

    def f(x, k):
        return conv2d(x, k, strides, padding, groups, algorithms=alg)

    g = jnp.asarray(rng.standard_normal(jax.eval_shape(f, x, k).shape), jnp.float32)
    if which == "forward":
        fn = jax.jit(f)
        return lambda: fn(x, k)
    if which == "input_grad":
        fn = jax.jit(lambda x, k, g: jax.vjp(lambda x: f(x, k), x)[1](g)[0])
    else:
        fn = jax.jit(lambda x, k, g: jax.vjp(lambda k: f(x, k), k)[1](g)[0])
    return lambda: fn(x, k, g)


def torch_pass(shape: tuple, which: str) -> Callable[[], object]:
    import torch

    x_shape, k_shape, strides, padding, groups = shape
    b, h, w, c = x_shape
    kh, kw, ci, o = k_shape
    x = torch.randn(b, c, h, w).contiguous(memory_format=torch.channels_last)
    k = (torch.randn(o, ci, kh, kw) * 0.05).contiguous(memory_format=torch.channels_last)
    pad = (padding[0][0], padding[1][0])
    x.requires_grad_(which == "input_grad")
    k.requires_grad_(which == "kernel_grad")

    def run():
        if which == "forward":
            with torch.no_grad():
                return torch.nn.functional.conv2d(x, k, None, strides, pad, 1, groups)
        y = torch.nn.functional.conv2d(x, k, None, strides, pad, 1, groups)
        return torch.autograd.grad(y, x if which == "input_grad" else k, torch.ones_like(y))

    return run


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def flops(shape: tuple) -> float:
    x_shape, (kh, kw, ci, o), strides, padding, _ = shape
    ho = (x_shape[1] + sum(padding[0]) - kh) // strides[0] + 1
    wo = (x_shape[2] + sum(padding[1]) - kw) // strides[1] + 1
    return 2.0 * x_shape[0] * ho * wo * o * kh * kw * ci


def main() -> None:
    cpu.configure()  # XLA:CPU flags, before JAX starts its backend
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--torch", action="store_true", help="also time PyTorch channels_last")
    parser.add_argument("--passes", default=",".join(PASSES))
    args = parser.parse_args()
    if args.torch:
        import torch

        torch.set_num_threads(2)
    print(f"{args.model} {args.size}x{args.size} batch {args.batch}: ms per pass, median "
          f"[min-max] of {args.rounds} alternating rounds; GF/s of the best; 'pick' = "
          f"choose_algorithms")
    totals: collections.Counter = collections.Counter()
    for *shape, count in conv_shapes(args.model, args.size, args.batch):
        shape = tuple(shape)
        pick = choose_algorithms(*shape[:4], shape[4], dtype=jnp.float32)
        for which in args.passes.split(","):
            if which == "input_grad" and shape[0][-1] == 3:
                continue  # the stem's input gradient is never computed
            cands = {alg: jax_pass(shape, alg, which)
                     for alg in formulations(which, shape[4], shape[2])}
            if args.torch:
                cands["torch"] = torch_pass(shape, which)
            times = {name: [] for name in cands}
            for fn in cands.values():
                timed(fn)  # compile / warm up
            for _ in range(args.rounds):
                for name, fn in cands.items():
                    times[name].append(timed(fn))
            med = {n: float(np.median(t)) for n, t in times.items()}
            chosen = getattr(pick, which)
            # A formulation that cannot compute this convolution counts XLA's time for it.
            for name in {*formulations(which, 1, (1, 1)), *med}:
                totals[(which, name)] += count * med.get(name, med[XLA])
            totals[(which, "pick")] += count * med[chosen]
            totals[(which, "best")] += count * min(med[a] for a in cands if a != "torch")
            cells = "  ".join(f"{n} {med[n] * 1e3:7.2f} [{min(t) * 1e3:.1f}-{max(t) * 1e3:.1f}]"
                              for n, t in times.items())
            best = min(med, key=med.get)
            print(f"x{count} {shape[0]} k{shape[1][:2]}->{shape[1][3]} s{shape[2][0]} "
                  f"g{shape[4]} {which:11s} {cells}  {flops(shape) / med[best] / 1e9:5.0f} GF/s "
                  f"({best}) pick {chosen}", flush=True)
    print("totals over the model (ms, x count):")
    for which in args.passes.split(","):
        names = sorted({n for w, n in totals if w == which})
        print(f"  {which:11s} " + "  ".join(f"{n} {totals[(which, n)] * 1e3:.0f}" for n in names))


if __name__ == "__main__":
    main()
