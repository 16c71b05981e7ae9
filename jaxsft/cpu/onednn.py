"""oneDNN's direct convolution on XLA:CPU, reached through XLA's own custom call.

jaxlib ships XLA:CPU with oneDNN inside, and its runtime executes a custom call named
`__onednn$convolution` (a forward convolution described by a `OneDnnConvolutionConfig` in the
backend config) with oneDNN's JIT kernels on XLA's intra-op threads. XLA's compiler only emits
that call in builds configured for it, which jaxlib's are not; this module emits it directly.
Measured against XLA's own (Eigen) convolutions on the 2-core AVX-512 machine of
benchmarks/cpu_notes.md: ResNet 3x3 forwards and stride-1 input gradients 1.2-1.7x faster.
Eigen spends 20-25% of a 56x56 convolution packing image patches; oneDNN convolves directly.

Only float32 (oneDNN has no float64 convolution), only forward convolutions (the input
gradient of a stride-1 convolution is one: the kernel flipped, its feature axes swapped), and
only the jaxlib versions whose runtime was tested (`available`): the config is XLA's internal
format. Everything else keeps XLA's convolution, as does everything when the environment has
JAXSFT_ONEDNN=off (read when a model is traced). oneDNN sums in its own order: results differ
from XLA's by float32 rounding (tests/test_onednn.py bounds it against float64).

XLA:CPU cannot serialize an executable that contains the call: with JAX's persistent
compilation cache on (the CLIs turn it on), storing one fails with `std::bad_alloc` and JAX
warns on every run. Those executables simply compile each run (seconds on a CPU), so
`jaxsft.cpu.configure()` silences exactly that warning; any other failure to write a cache
entry still warns.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax._src.interpreters.mlir import custom_call  # api_version 1 calls: not in jax.ffi
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

from jaxsft.cpu import xla_flags

__all__ = ["available", "conv", "input_grad"]

TARGET = "__onednn$convolution"
ENV_VAR = "JAXSFT_ONEDNN"  # "off": XLA's convolutions only
TESTED_JAXLIB = ("0.10.2",)  # runtimes whose config format and thunk were checked by the tests
# Tensor dimension roles, as the config names them: (batch, feature, *spatial) for data,
# (input feature, output feature, *spatial) for the kernel. NHWC data, HWIO kernel.
NHWC = (0, 3, 1, 2)
HWIO = (2, 3, 0, 1)
HWOI = (3, 2, 0, 1)  # an HWIO array read with its feature axes swapped

Padding = tuple[tuple[int, int], tuple[int, int]]


@functools.cache
def _runtime_tested() -> bool:
    return xla_flags.is_tested(TESTED_JAXLIB)


def available(dtype) -> bool:
    """Whether `conv`/`input_grad` can and may compute this dtype on this jaxlib's XLA:CPU."""
    return (jnp.dtype(dtype) == jnp.float32 and _runtime_tested()
            and os.environ.get(ENV_VAR, "").lower() != "off")


def conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
         padding: Padding) -> jax.Array:
    """`lax.conv_general_dilated(x, kernel, strides, padding)`, NHWC x HWIO -> NHWC."""
    return _conv(x, kernel, tuple(strides), _tuple(padding), HWIO)


def input_grad(g: jax.Array, kernel: jax.Array, padding: Padding) -> jax.Array:
    """dx of a stride-1 convolution with this padding, given the output cotangent g:
    the forward convolution of g with the kernel flipped in space, read from O to I."""
    kh, kw = kernel.shape[:2]
    (top, bottom), (left, right) = padding
    flipped = kernel[::-1, ::-1]
    padding = ((kh - 1 - top, kh - 1 - bottom), (kw - 1 - left, kw - 1 - right))
    return _conv(g, flipped, (1, 1), padding, HWOI)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, kernel, strides, padding, kernel_dims):
    return _conv_p.bind(x, kernel, strides=strides, padding=padding, kernel_dims=kernel_dims)


def _conv_fwd(x, kernel, strides, padding, kernel_dims):
    return _conv(x, kernel, strides, padding, kernel_dims), (x, kernel)


def _conv_bwd(strides, padding, kernel_dims, residuals, g):
    # Only higher-order gradients come here (conv.py writes the first-order ones): XLA's.
    reference = functools.partial(_reference, strides=strides, padding=padding,
                                  kernel_dims=kernel_dims)
    return jax.vjp(reference, *residuals)[1](g)


_conv.defvjp(_conv_fwd, _conv_bwd)


def _tuple(padding: Sequence[Sequence[int]]) -> Padding:
    (top, bottom), (left, right) = padding
    return (int(top), int(bottom)), (int(left), int(right))


def _reference(x, kernel, *, strides, padding, kernel_dims):
    """The same convolution by XLA: for batching, and the semantics the tests check."""
    if kernel_dims == HWOI:
        kernel = jnp.swapaxes(kernel, 2, 3)
    return lax.conv_general_dilated(x, kernel, strides, padding,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _abstract_eval(x, kernel, *, strides, padding, kernel_dims):
    out = jax.eval_shape(functools.partial(_reference, strides=strides, padding=padding,
                                           kernel_dims=kernel_dims), x, kernel)
    return jax.core.ShapedArray(out.shape, out.dtype)


def _lowering(ctx, x, kernel, *, strides, padding, kernel_dims):
    shape = ctx.avals_in[1].shape
    config = {"onednn_conv_config": {
        "dims": 4,
        "input": {"dims": 4, "data": _data_layout(NHWC)},
        "kernel": {"dims": 4, "filter": {
            "input_feature_dim": kernel_dims[0], "output_feature_dim": kernel_dims[1],
            "spatial_dims": list(kernel_dims[2:]), "shape": list(shape)}},
        "output": {"dims": 4, "data": _data_layout(NHWC)},
        "window": {"size": [shape[d] for d in kernel_dims[2:]],
                   "pad_left": [p[0] for p in padding], "pad_right": [p[1] for p in padding],
                   "strides": list(strides), "window_dilations": [1, 1]},
        "feature_groups": 1}}
    out_type = mlir.aval_to_ir_type(ctx.module_context, ctx.avals_out[0])
    return custom_call(TARGET, result_types=[out_type], operands=[x, kernel],
                       backend_config=json.dumps(config), api_version=1).results


def _data_layout(dims: tuple[int, ...]) -> dict:
    return {"batch_dim": dims[0], "feature_dim": dims[1], "spatial_dims": list(dims[2:])}


def _batch(args, dims, **params):
    # vmap of the model (per-example gradients, ensembles): XLA's convolution, vmapped.
    return jax.vmap(functools.partial(_reference, **params), in_axes=dims)(*args), 0


_conv_p = Primitive("jaxsft_onednn_conv")
_conv_p.def_impl(lambda *args, **params: jax.jit(functools.partial(_conv_p.bind, **params))(*args))
_conv_p.def_abstract_eval(_abstract_eval)
mlir.register_lowering(_conv_p, _lowering, platform="cpu")
batching.primitive_batchers[_conv_p] = _batch
