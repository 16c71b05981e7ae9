"""2-D convolution that is fast on XLA:CPU, exact everywhere.

XLA:CPU runs some convolutions and convolution gradients far below its matrix-product speed:
a 3x3 convolution on a 2x2 map is rewritten with the kernel as the "image" and runs at
~1 GFLOP/s, and a 1x1 convolution's kernel gradient goes through layout transposes with the
BatchNorm backward fused into them. The same arithmetic written as taps (strided slices of the
padded input, concatenated along the channels: im2col) and one matrix product runs at dot
speed; its gradients are matrix products too: dx = col2im(g W^T), dW = patches^T g, written
out in a custom VJP with the transposes placed where XLA's YNNPACK dots accept them. Where
XLA's convolution is fast, its kernel gradient still needs both operands transposed, and
XLA:CPU recomputes BatchNorm and ReLU inside those transposes; the "xla-stored" kernel
gradient writes that convolution out with the transposes made from stored values.

On large float32 maps the forward pass and the stride-1 input gradient go to oneDNN's direct
convolution instead (`jaxsft.cpu.onednn`: XLA:CPU's own oneDNN custom call, 1.2-1.7x
faster than its Eigen convolution there).

`conv2d` picks, per pass (forward, input gradient, kernel gradient) and per shape, XLA's
convolution, oneDNN's or the matrix-product form; the choice only changes float rounding.
On any other backend (GPU, TPU) it is plain `lax.conv_general_dilated`. `Conv` is a drop-in for
`flax.linen.Conv(use_bias=False)`: same parameter ("kernel", HWIO), init and dtype promotion.
Unless every pass is plain "xla" the convolution on the CPU is a custom VJP: reverse-mode
(grad, vjp) works to any order, forward-mode (jvp, jacfwd) does not.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from jaxsft.cpu import onednn
from jaxsft.cpu.stored import from_storage

XLA = "xla"
GEMM = "gemm"
XLA_STORED = "xla-stored"  # kernel gradient only: see _stored_kernel_grad
ONEDNN = "onednn"  # forward and stride-1 input gradient, float32 only: see jaxsft.cpu.onednn
ALGORITHMS = (XLA, GEMM)
KERNEL_GRAD_ALGORITHMS = (XLA, GEMM, XLA_STORED)
DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")

Padding = tuple[tuple[int, int], tuple[int, int]]
PaddingLike = str | int | Sequence[int | tuple[int, int]]  # as flax.linen.Conv accepts

# choose_algorithms' threshold (output positions Ho*Wo), from benchmarks/cpu_notes.md.
SMALL_MAP = 16

__all__ = ["ALGORITHMS", "KERNEL_GRAD_ALGORITHMS", "ONEDNN", "Algorithms", "Conv",
           "choose_algorithms", "conv2d", "max_pool"]


class Algorithms(NamedTuple):
    """How each pass computes: "xla" (lax convolution) or "gemm" (taps + matrix product).

    The kernel gradient may also be "xla-stored": XLA's convolution on operands transposed
    from their stored values (see `_stored_kernel_grad`); the forward pass and a stride-1
    input gradient may be "onednn" (float32 on the CPU, `jaxsft.cpu.onednn`).
    """

    forward: str = XLA
    input_grad: str = XLA
    kernel_grad: str = XLA


class _Geometry(NamedTuple):
    """The static description of one convolution (hashable: a custom_vjp static argument)."""

    strides: tuple[int, int]
    padding: Padding
    groups: int
    algorithms: Algorithms


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    strides: Sequence[int] = (1, 1),
    padding: PaddingLike = ((0, 0), (0, 0)),
    feature_group_count: int = 1,
    *,
    algorithms: Algorithms | None = None,
) -> jax.Array:
    """NHWC x HWIO convolution, `lax.conv_general_dilated` semantics (no dilation).

    `algorithms` forces the CPU formulation of each pass (tests, benchmarks); by default
    `choose_algorithms` decides from the shapes. Other backends always use XLA's convolution.
    """
    strides = _pair(strides, "strides")
    if x.ndim != 4 or kernel.ndim != 4:
        raise ValueError(f"conv2d takes NHWC input and HWIO kernel, got shapes {x.shape} and "
                         f"{kernel.shape}")
    pads = _padding(padding, x.shape[1:3], kernel.shape[:2], strides)
    _check_shapes(x.shape, kernel.shape, feature_group_count)
    if algorithms is None:
        algorithms = choose_algorithms(x.shape, kernel.shape, strides, pads, feature_group_count,
                                       dtype=x.dtype if kernel.dtype == x.dtype else None)
    else:
        _check_algorithms(algorithms, strides, feature_group_count, x.dtype, kernel.dtype)
    geometry = _Geometry(strides, pads, feature_group_count, Algorithms(*algorithms))
    xla = functools.partial(_xla_conv, geometry=geometry)
    if geometry.algorithms == Algorithms(XLA, XLA, XLA):
        return xla(x, kernel)
    return lax.platform_dependent(x, kernel, cpu=functools.partial(_cpu_conv, geometry=geometry),
                                  default=xla)


def _check_algorithms(algorithms: Sequence[str], strides: tuple[int, int], groups: int,
                      dtype: Any, kernel_dtype: Any) -> None:
    if (len(algorithms) != 3 or any(a not in (*ALGORITHMS, ONEDNN) for a in algorithms[:2])
            or algorithms[2] not in KERNEL_GRAD_ALGORITHMS):
        raise ValueError(f"algorithms must be (forward, input_grad, kernel_grad) drawn from "
                         f"{ALGORITHMS}, the forward and input gradient also from {ONEDNN!r}, "
                         f"the kernel gradient also from {XLA_STORED!r}; got {algorithms}")
    if algorithms[2] == XLA_STORED and groups != 1:
        raise ValueError(f"the {XLA_STORED!r} kernel gradient needs feature_group_count=1: "
                         f"use {XLA!r} for grouped convolutions")
    if ONEDNN in algorithms:
        if groups != 1 or (algorithms[1] == ONEDNN and strides != (1, 1)):
            raise ValueError(f"{ONEDNN!r} computes ungrouped forward passes and stride-1 input "
                             f"gradients only: use {XLA!r} here")
        if kernel_dtype != dtype or not onednn.available(dtype):
            raise ValueError(f"{ONEDNN!r} needs float32 input and kernel, jaxlib "
                             f"{' or '.join(onednn.TESTED_JAXLIB)} and {onednn.ENV_VAR} not "
                             f"'off': use {XLA!r} here")


def choose_algorithms(
    x_shape: Sequence[int],
    kernel_shape: Sequence[int],
    strides: tuple[int, int],
    padding: Padding,
    groups: int = 1,
    dtype: Any = None,
) -> Algorithms:
    """The faster formulation of each pass on XLA:CPU, by rules measured on ResNets.

    - 1x1 kernels: a matrix product in every pass (XLA's 1x1 kernel gradient is 3-8x slower).
    - small output maps (<= 16 positions): matrix products (XLA swaps the operands of a 3x3
      conv on a 2x2 map and runs at ~1 GFLOP/s).
    - grouped convolutions: XLA's convolution in every pass.
    - otherwise (large maps, the 7x7 stem): XLA's convolution, the kernel gradient from stored
      operands (XLA:CPU would recompute BatchNorm and ReLU inside its operand transposes);
      for a float32 `dtype`, oneDNN's convolution for the forward pass and, at stride 1, the
      input gradient.
    The measurements behind each rule are in benchmarks/cpu_notes.md.
    """
    kh, kw = kernel_shape[:2]
    if groups != 1:
        return Algorithms(XLA, XLA, XLA)
    if kh == kw == 1:
        return Algorithms(GEMM, GEMM, GEMM)
    positions = _output_size(x_shape[1], kh, strides[0], padding[0]) * _output_size(
        x_shape[2], kw, strides[1], padding[1])
    if positions <= SMALL_MAP:
        return Algorithms(GEMM, GEMM, GEMM)
    if dtype is not None and onednn.available(dtype):
        return Algorithms(ONEDNN, ONEDNN if strides == (1, 1) else XLA, XLA_STORED)
    return Algorithms(XLA, XLA, XLA_STORED)


def _output_size(size: int, window: int, stride: int, pad: tuple[int, int]) -> int:
    return (size + pad[0] + pad[1] - window) // stride + 1


class Conv(nn.Module):
    """`flax.linen.Conv` without bias, NHWC/HWIO, computed by `conv2d`.

    Same parameter name, shape ((kh, kw, in_features // groups, features)), initialiser call
    and dtype promotion as `nn.Conv(..., use_bias=False)`, so variables are interchangeable.
    """

    features: int
    kernel_size: Sequence[int]
    strides: Sequence[int] = (1, 1)
    padding: PaddingLike = ((0, 0), (0, 0))
    feature_group_count: int = 1
    use_bias: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable[..., jax.Array] = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.use_bias:
            raise ValueError("jaxsft Conv has no bias (ResNets follow every conv with BatchNorm): "
                             "use flax.linen.Conv for a biased convolution")
        kh, kw = _pair(self.kernel_size, "kernel_size")
        in_features = x.shape[-1]
        if in_features % self.feature_group_count:
            raise ValueError(f"input features {in_features} are not divisible by "
                             f"feature_group_count={self.feature_group_count}")
        shape = (kh, kw, in_features // self.feature_group_count, self.features)
        kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        return conv2d(x, kernel, self.strides, self.padding, self.feature_group_count)


# ------------------------------------------------------------------------- formulations


def _xla_conv(x: jax.Array, kernel: jax.Array, geometry: _Geometry) -> jax.Array:
    return lax.conv_general_dilated(x, kernel, geometry.strides, geometry.padding,
                                    dimension_numbers=DIMENSION_NUMBERS,
                                    feature_group_count=geometry.groups)


def _gemm_conv(x: jax.Array, kernel: jax.Array, geometry: _Geometry) -> jax.Array:
    """im2col + one (batched over groups) matrix product; differentiable into dots."""
    kh, kw, cin_g, cout = kernel.shape
    g = geometry.groups
    patches = _patches(x, (kh, kw), geometry.strides, geometry.padding)  # B,Ho,Wo,T*C
    b, ho, wo, _ = patches.shape
    if g == 1:
        return lax.dot_general(patches, kernel.reshape(kh * kw * cin_g, cout),
                               (((3,), (0,)), ((), ())))
    # Channels of x and of the output are group-major: c = group * per_group + i.
    patches = patches.reshape(b, ho, wo, kh * kw, g, cin_g)
    w = kernel.reshape(kh * kw, cin_g, g, cout // g)
    y = lax.dot_general(patches, w, (((3, 5), (0, 1)), ((4,), (2,))))  # G,B,Ho,Wo,Og
    return jnp.moveaxis(y, 0, 3).reshape(b, ho, wo, cout)


def _patches(x: jax.Array, window: tuple[int, int], strides: tuple[int, int],
             padding: Padding) -> jax.Array:
    """[B, Ho, Wo, kh*kw*C], feature order (i, j, c) as in a reshaped HWIO kernel."""
    (kh, kw), (sh, sw) = window, strides
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0))) if any(p for pair in padding for p in pair) else x
    ho = (xp.shape[1] - kh) // sh + 1
    wo = (xp.shape[2] - kw) // sw + 1
    taps = [
        lax.slice(xp, (0, i, j, 0), (xp.shape[0], i + sh * (ho - 1) + 1,
                                     j + sw * (wo - 1) + 1, xp.shape[3]), (1, sh, sw, 1))
        for i in range(kh) for j in range(kw)
    ]
    return taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)


def _gemm_input_grad(g: jax.Array, kernel: jax.Array, x_shape: Sequence[int],
                     geometry: _Geometry) -> jax.Array:
    """dx = col2im(g W^T): the kernel matrix is transposed explicitly (it is small) so the
    product is a plain row-major dot, then patch gradients are scattered back with pads."""
    kh, kw, cin, cout = kernel.shape
    kernel_t = jnp.transpose(kernel.reshape(kh * kw * cin, cout))  # [O, T*C]
    d_patches = lax.dot_general(g, kernel_t, (((3,), (0,)), ((), ())))
    _, col2im = jax.vjp(lambda x: _patches(x, (kh, kw), geometry.strides, geometry.padding),
                        jnp.zeros(x_shape, g.dtype))
    return col2im(d_patches)[0]


def _gemm_kernel_grad(x: jax.Array, g: jax.Array, kernel_shape: Sequence[int],
                      geometry: _Geometry) -> jax.Array:
    """dK = patches^T g with the patches transposed first, so the product is a plain dot.

    Left to autodiff, XLA transposes g instead, with the BatchNorm backward fused into that
    transpose (~1 s per ResNet-50 step), and runs the product outside YNNPACK. (Building the
    transposed patches from the stored x, as `_stored_kernel_grad` does, measured 0.96-0.99x
    on ResNet-50: XLA's transpose of wide patches is slow. benchmarks/cpu_notes.md, 2c.)
    """
    kh, kw, cin, cout = kernel_shape
    patches = _patches(x, (kh, kw), geometry.strides, geometry.padding)
    patches_t = jnp.transpose(patches.reshape(-1, kh * kw * cin))  # [T*C, N]
    return lax.dot(patches_t, g.reshape(-1, cout)).reshape(kernel_shape)


def _stored_kernel_grad(x: jax.Array, g: jax.Array, kernel_shape: Sequence[int],
                        geometry: _Geometry) -> jax.Array:
    """dK as XLA's convolution with the batch as the contracted feature dimension, written out.

    This is the convolution autodiff emits (x as [C, H, W, N] images, g as an [Ho, Wo, N, O]
    kernel dilated by the stride, output [C, kh, kw, O]), with both operand transposes made
    explicit and computed from the stored x and g (`jaxsft.cpu.stored`). Left to autodiff,
    XLA:CPU fuses each activation's BatchNorm, residual add and ReLU (up to two blocks deep)
    into the transpose that feeds this convolution and recomputes them for every strided
    element: 5-20x the time of the transpose alone.
    """
    kh, kw, _, _ = kernel_shape
    (_, h, w, _), (_, ho, wo, _) = x.shape, g.shape
    (sh, sw), ((top, _), (left, _)) = geometry.strides, geometry.padding
    x_t = from_storage(lambda x: jnp.transpose(x, (3, 1, 2, 0)), x)  # C, H, W, N
    g_t = from_storage(lambda g: jnp.transpose(g, (1, 2, 0, 3)), g)  # Ho, Wo, N, O
    # The padding that makes the output exactly kh x kw (lax's conv kernel-gradient rule).
    padding = ((top, (ho - 1) * sh + kh - h - top), (left, (wo - 1) * sw + kw - w - left))
    dk = lax.conv_general_dilated(x_t, g_t, (1, 1), padding, rhs_dilation=(sh, sw),
                                  dimension_numbers=DIMENSION_NUMBERS)  # C, kh, kw, O
    return jnp.transpose(dk, (1, 2, 0, 3))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _cpu_conv_vjp(x: jax.Array, kernel: jax.Array, geometry: _Geometry) -> jax.Array:
    if geometry.algorithms.forward == ONEDNN:
        return onednn.conv(x, kernel, geometry.strides, geometry.padding)
    forward = _gemm_conv if geometry.algorithms.forward == GEMM else _xla_conv
    return forward(x, kernel, geometry)


def _cpu_conv_fwd(x: jax.Array, kernel: jax.Array, geometry: _Geometry):
    return _cpu_conv_vjp(x, kernel, geometry), (x, kernel)


def _cpu_conv_bwd(geometry: _Geometry, residuals: tuple, g: jax.Array):
    x, kernel = residuals
    algorithms = geometry.algorithms

    def autodiff(conv: Callable) -> tuple[jax.Array, jax.Array]:
        # Both gradients of one formulation; XLA drops the one this pass does not use.
        return jax.vjp(functools.partial(conv, geometry=geometry), x, kernel)[1](g)

    # Grouped matrix products keep autodiff: their gradients are batched dots already.
    by_gemm = autodiff(_gemm_conv) if geometry.groups != 1 else None
    if algorithms.input_grad == XLA:
        dx = autodiff(_xla_conv)[0]
    elif algorithms.input_grad == ONEDNN:
        dx = onednn.input_grad(g, kernel, geometry.padding)
    else:
        dx = by_gemm[0] if by_gemm else _gemm_input_grad(g, kernel, x.shape, geometry)
    if algorithms.kernel_grad == XLA:
        dk = autodiff(_xla_conv)[1]
    elif algorithms.kernel_grad == XLA_STORED:
        dk = _stored_kernel_grad(x, g, kernel.shape, geometry)
    else:
        dk = by_gemm[1] if by_gemm else _gemm_kernel_grad(x, g, kernel.shape, geometry)
    return dx, dk


_cpu_conv_vjp.defvjp(_cpu_conv_fwd, _cpu_conv_bwd)


def _cpu_conv(x: jax.Array, kernel: jax.Array, geometry: _Geometry) -> jax.Array:
    if geometry.algorithms == Algorithms(XLA, XLA, XLA):
        return _xla_conv(x, kernel, geometry)
    return _cpu_conv_vjp(x, kernel, geometry)


# ------------------------------------------------------------------------- max pooling


def max_pool(x: jax.Array, window: int = 3, stride: int = 2, padding: int = 0) -> jax.Array:
    """NHWC max pooling with symmetric -inf padding, torch.nn.functional.max_pool2d semantics.

    On CPU the forward is the maximum of strided slices and the gradient goes to the first
    maximum of each window in row-major order (torch's choice), scattered with pads: XLA:CPU's
    own gradient of `reduce_window` (select-and-scatter) takes ~10x longer than the
    convolution after it. Other backends use `flax.linen.max_pool`, whose gradient also picks
    the first maximum.
    """
    if x.ndim != 4:
        raise ValueError(f"max_pool takes NHWC input, got shape {x.shape}")
    if min(window, stride) < 1 or padding < 0 or 2 * padding > window:
        raise ValueError(f"max_pool needs window, stride >= 1 and 0 <= padding <= window / 2, "
                         f"got window={window}, stride={stride}, padding={padding}")
    pool = _PoolGeometry(window, stride, padding)

    def default(x: jax.Array) -> jax.Array:
        return nn.max_pool(x, (window, window), (stride, stride),
                           ((padding, padding), (padding, padding)))

    return lax.platform_dependent(x, cpu=functools.partial(_tap_max_pool, pool=pool),
                                  default=default)


class _PoolGeometry(NamedTuple):
    window: int
    stride: int
    padding: int


def _pool_taps(x: jax.Array, pool: _PoolGeometry) -> list[jax.Array]:
    k, s, p = pool
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), constant_values=-jnp.inf)
    ho = (xp.shape[1] - k) // s + 1
    wo = (xp.shape[2] - k) // s + 1
    return [
        lax.slice(xp, (0, i, j, 0), (xp.shape[0], i + s * (ho - 1) + 1, j + s * (wo - 1) + 1,
                                     xp.shape[3]), (1, s, s, 1))
        for i in range(k) for j in range(k)
    ]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _tap_max_pool(x: jax.Array, pool: _PoolGeometry) -> jax.Array:
    return functools.reduce(jnp.maximum, _pool_taps(x, pool))


def _tap_max_pool_fwd(x: jax.Array, pool: _PoolGeometry):
    taps = _pool_taps(x, pool)
    index_dtype = jnp.int8 if len(taps) <= 127 else jnp.int32
    y, first = taps[0], jnp.zeros(taps[0].shape, index_dtype)
    for t, tap in enumerate(taps[1:], 1):
        later = tap > y  # strict: ties keep the earlier (first) maximum
        first = jnp.where(later, jnp.asarray(t, index_dtype), first)
        y = jnp.where(later, tap, y)
    return y, (first, x.shape)


def _tap_max_pool_bwd(pool: _PoolGeometry, residuals: tuple, g: jax.Array):
    first, shape = residuals
    k, s, p = pool
    ho, wo = g.shape[1:3]
    hp, wp = shape[1] + 2 * p, shape[2] + 2 * p
    zero = jnp.zeros((), g.dtype)
    grads = []
    for t in range(k * k):
        i, j = divmod(t, k)
        routed = jnp.where(first == t, g, zero)
        grads.append(lax.pad(routed, zero, ((0, 0, 0), (i, hp - i - s * (ho - 1) - 1, s - 1),
                                            (j, wp - j - s * (wo - 1) - 1, s - 1), (0, 0, 0))))
    dxp = functools.reduce(jnp.add, grads)
    return (dxp[:, p:p + shape[1], p:p + shape[2], :],)


_tap_max_pool.defvjp(_tap_max_pool_fwd, _tap_max_pool_bwd)


# ------------------------------------------------------------------------- arguments


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair of them, got {value!r}")
    return pair  # type: ignore[return-value]


def _padding(padding: PaddingLike, spatial: Sequence[int],
             window: Sequence[int], strides: tuple[int, int]) -> Padding:
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(f"padding must be 'SAME', 'VALID', an int or ((top, bottom), "
                             f"(left, right)), got {padding!r}")
        pads = lax.padtype_to_pads(tuple(spatial), tuple(window), strides, padding.upper())
    elif isinstance(padding, int):
        pads = [(padding, padding)] * 2
    else:
        pads = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
    if len(pads) != 2 or not all(len(p) == 2 and all(isinstance(v, int) and v >= 0 for v in p)
                                 for p in pads):
        raise ValueError(f"padding must be 'SAME', 'VALID', an int or ((top, bottom), (left, "
                         f"right)) of non-negative ints, got {padding!r}")
    return tuple((int(lo), int(hi)) for lo, hi in pads)  # type: ignore[return-value]


def _check_shapes(x_shape: Sequence[int], kernel_shape: Sequence[int], groups: int) -> None:
    if groups < 1 or x_shape[3] % groups or kernel_shape[3] % groups:
        raise ValueError(f"feature_group_count={groups} must divide the input features "
                         f"{x_shape[3]} and the output features {kernel_shape[3]}")
    if kernel_shape[2] * groups != x_shape[3]:
        raise ValueError(f"kernel {tuple(kernel_shape)} expects {kernel_shape[2] * groups} "
                         f"input features (HWIO, I = in_features / groups), got {x_shape[3]}")
