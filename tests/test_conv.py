"""jaxsft.cpu.conv against lax.conv_general_dilated, torch and flax.linen.

Every formulation of every pass (forced through `algorithms`) must compute the same function
as XLA's convolution: to ~1e-12 in float64, to float32 rounding otherwise.
"""

import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import fusion_operand_counts
from jax import export, lax

from jaxsft.cpu.conv import (
    ALGORITHMS,
    KERNEL_GRAD_ALGORITHMS,
    Algorithms,
    Conv,
    choose_algorithms,
    conv2d,
    max_pool,
)

DN = ("NHWC", "HWIO", "NHWC")
ALL_ALGORITHMS = [Algorithms(*a) for a in
                  itertools.product(ALGORITHMS, ALGORITHMS, KERNEL_GRAD_ALGORITHMS)]

# (batch, height, width, in, out, kernel, stride, padding, groups): strides 1, 2 and 3, kernels
# 1/3/4/7, odd and non-square maps, asymmetric padding, groups > 1, a 2x2 map (XLA's slow case).
SHAPES = [
    (2, 5, 7, 4, 6, 3, 1, ((1, 1), (1, 1)), 1),
    (2, 9, 8, 4, 6, 3, 2, ((1, 1), (1, 1)), 1),
    (3, 7, 9, 6, 5, 1, 1, ((0, 0), (0, 0)), 1),
    (2, 9, 9, 6, 4, 1, 2, ((0, 0), (0, 0)), 1),
    (2, 11, 10, 3, 5, 7, 2, ((3, 3), (3, 3)), 1),
    (2, 6, 6, 8, 12, 3, 1, ((1, 1), (1, 1)), 4),
    (2, 7, 7, 8, 8, 3, 2, ((0, 2), (1, 0)), 2),
    (4, 2, 2, 16, 8, 3, 1, ((1, 1), (1, 1)), 1),
    (2, 10, 11, 3, 4, 4, 3, ((2, 0), (0, 1)), 1),
]


def reference(x, kernel, stride, padding, groups):
    return lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                    dimension_numbers=DN, feature_group_count=groups)


def random_case(shape, dtype, seed=0):
    b, h, w, cin, cout, k, stride, padding, groups = shape
    rng = np.random.RandomState(seed)
    x = jnp.asarray(rng.standard_normal((b, h, w, cin)), dtype)
    kernel = jnp.asarray(rng.standard_normal((k, k, cin // groups, cout)), dtype)
    y = reference(x, kernel, stride, padding, groups)
    cotangent = jnp.asarray(rng.standard_normal(y.shape), dtype)
    return x, kernel, cotangent


def value_and_grads(fn, x, kernel, cotangent):
    y, vjp = jax.vjp(fn, x, kernel)
    return (y, *vjp(cotangent))


def assert_matches_reference(shape, algorithms, dtype, rtol, atol):
    x, kernel, ct = random_case(shape, dtype)
    _, _, _, _, _, _, stride, padding, groups = shape

    def ours(x, kernel):
        return conv2d(x, kernel, (stride, stride), padding, groups, algorithms=algorithms)

    got = jax.jit(lambda *a: value_and_grads(ours, *a))(x, kernel, ct)
    want = value_and_grads(lambda x, k: reference(x, k, stride, padding, groups), x, kernel, ct)
    for name, g, w in zip(("output", "input grad", "kernel grad"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=atol,
                                   err_msg=f"{name} with {algorithms}")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_every_formulation_matches_xla_in_float64(shape, x64):
    groups = shape[-1]
    for algorithms in ALL_ALGORITHMS:
        if groups != 1 and algorithms.kernel_grad == "xla-stored":
            continue  # refused with a message: test_bad_arguments_raise_clear_errors
        assert_matches_reference(shape, algorithms, jnp.float64, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_default_choice_matches_xla_in_float32(shape):
    # Sums of up to 7*7*3 products of unit normals: float32 rounding, relative to magnitude.
    assert_matches_reference(shape, None, jnp.float32, rtol=1e-4, atol=1e-4)


def test_matrix_product_form_matches_xla_in_float32_at_resnet_widths():
    shape = (8, 2, 2, 256, 256, 3, 1, ((1, 1), (1, 1)), 1)  # layer4 of ResNet-18 at 64x64
    assert_matches_reference(shape, Algorithms("gemm", "gemm", "gemm"), jnp.float32,
                             rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[4], SHAPES[6], SHAPES[7]], ids=str)
def test_matches_torch_conv2d_and_autograd_in_float64(shape, x64):
    x, kernel, ct = random_case(shape, jnp.float64, seed=1)
    _, _, _, _, _, _, stride, padding, groups = shape
    got = value_and_grads(lambda x, k: conv2d(x, k, (stride, stride), padding, groups), x,
                          kernel, ct)
    (top, bottom), (left, right) = padding
    tx = torch.tensor(np.asarray(x).transpose(0, 3, 1, 2), requires_grad=True)
    tk = torch.tensor(np.asarray(kernel).transpose(3, 2, 0, 1), requires_grad=True)
    padded = torch.nn.functional.pad(tx, (left, right, top, bottom))  # torch pads symmetrically
    ty = torch.nn.functional.conv2d(padded, tk, stride=stride, groups=groups)
    ty.backward(torch.tensor(np.asarray(ct).transpose(0, 3, 1, 2)))
    want = (ty.detach().numpy().transpose(0, 2, 3, 1), tx.grad.numpy().transpose(0, 2, 3, 1),
            tk.grad.numpy().transpose(2, 3, 1, 0))
    for name, g, w in zip(("output", "input grad", "kernel grad"), got, want):
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-12, atol=1e-12, err_msg=name)


def test_conv_module_is_a_drop_in_for_flax_conv(x64):
    kwargs = dict(features=6, kernel_size=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                  use_bias=False, dtype=jnp.float64, param_dtype=jnp.float64)
    x = jnp.asarray(np.random.RandomState(2).standard_normal((2, 9, 7, 4)))
    ours, theirs = Conv(**kwargs), nn.Conv(**kwargs)
    key = jax.random.key(3)
    variables = ours.init(key, x)
    assert jax.tree.map(jnp.shape, variables) == {"params": {"kernel": (3, 3, 4, 6)}}
    np.testing.assert_array_equal(variables["params"]["kernel"],
                                  theirs.init(key, x)["params"]["kernel"])
    np.testing.assert_allclose(ours.apply(variables, x), theirs.apply(variables, x),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("padding", ["SAME", "VALID", 1])
def test_conv_module_string_and_int_padding_follow_lax(padding):
    x = jnp.asarray(np.random.RandomState(4).standard_normal((2, 8, 7, 3)), jnp.float32)
    module = Conv(5, 3, strides=2, padding=padding)
    variables = module.init(jax.random.key(0), x)
    kernel = variables["params"]["kernel"]
    pads = ((padding, padding),) * 2 if isinstance(padding, int) else padding
    want = lax.conv_general_dilated(x, kernel, (2, 2), pads, dimension_numbers=DN)
    np.testing.assert_allclose(module.apply(variables, x), want, rtol=1e-5, atol=1e-5)


def test_xla_formulation_keeps_forward_mode_and_gemm_supports_second_order(x64):
    x, kernel, _ = random_case(SHAPES[0], jnp.float64)
    tangents = (jnp.ones_like(x), jnp.ones_like(kernel))
    ours = functools.partial(conv2d, strides=1, padding=1, algorithms=Algorithms())
    theirs = functools.partial(reference, stride=1, padding=((1, 1), (1, 1)), groups=1)
    np.testing.assert_allclose(jax.jvp(ours, (x, kernel), tangents)[1],
                               jax.jvp(theirs, (x, kernel), tangents)[1], rtol=1e-12, atol=1e-12)
    gemm = functools.partial(conv2d, strides=1, padding=1, algorithms=Algorithms(*["gemm"] * 3))

    def grad_norm(conv):  # reverse-over-reverse through the custom VJP
        return lambda k: jnp.sum(jax.grad(lambda k: jnp.sum(conv(x, k) ** 2))(k) ** 2)

    np.testing.assert_allclose(jax.grad(grad_norm(gemm))(kernel),
                               jax.grad(grad_norm(theirs))(kernel), rtol=1e-10, atol=1e-10)


def test_small_maps_and_1x1_kernels_use_matrix_products_and_the_stem_uses_xla():
    gemm, xla = Algorithms("gemm", "gemm", "gemm"), Algorithms("xla", "xla", "xla-stored")
    assert choose_algorithms((32, 2, 2, 512), (3, 3, 512, 512), (1, 1), ((1, 1),) * 2) == gemm
    assert choose_algorithms((32, 56, 56, 64), (1, 1, 64, 256), (1, 1), ((0, 0),) * 2) == gemm
    assert choose_algorithms((32, 224, 224, 3), (7, 7, 3, 64), (2, 2), ((3, 3),) * 2) == xla
    # ResNet layer4 at 224x224: a 7x7 map is large enough for (Eigen's) XLA convolution.
    assert choose_algorithms((32, 7, 7, 512), (3, 3, 512, 512), (1, 1), ((1, 1),) * 2) == xla
    assert choose_algorithms((32, 4, 4, 256), (3, 3, 256, 256), (1, 1), ((1, 1),) * 2) == gemm
    assert (choose_algorithms((32, 4, 4, 64), (3, 3, 4, 64), (1, 1), ((1, 1),) * 2, 16)
            == Algorithms("xla", "xla", "xla"))


def transposing_fusion_operands(algorithms: Algorithms) -> list[int]:
    """Operand counts of the compiled fusions that transpose a 4-D array in the kernel
    gradient of conv(relu(x * s + b)): 1 means a transpose of a stored array."""
    def loss(kernel, x, s, b):
        return jnp.sum(conv2d(jax.nn.relu(x * s + b), kernel, 1, 1, algorithms=algorithms) ** 2)

    args = (jnp.ones((3, 3, 8, 16)), jnp.ones((4, 12, 12, 8)), jnp.ones(8), jnp.ones(8))
    text = jax.jit(jax.grad(loss)).lower(*args).compile().as_text()
    return fusion_operand_counts(text, r" (transpose|copy)\(", r"-> f32\[\d+,\d+,\d+,\d+\]")


def test_stored_kernel_gradient_transposes_stored_values_not_their_producers():
    # Autodiff's kernel gradient: XLA:CPU fuses the ReLU(x * s + b) into the transpose of
    # the activation. If this ever stops failing, XLA fixed it and "xla-stored" may go.
    assert max(transposing_fusion_operands(Algorithms("xla", "xla", "xla"))) > 1
    counts = transposing_fusion_operands(Algorithms("xla", "xla", "xla-stored"))
    assert counts and max(counts) == 1


def test_other_backends_get_plain_xla_convolutions():
    def step(x, kernel):
        return jax.grad(lambda x, k: conv2d(x, k, 1, ((1, 1), (1, 1))).sum(), (0, 1))(x, kernel)

    args = (jax.ShapeDtypeStruct((4, 2, 2, 32), jnp.float32),
            jax.ShapeDtypeStruct((3, 3, 32, 32), jnp.float32))
    convs, dots = conv_ops(export.export(jax.jit(step), platforms=["cpu"])(*args))
    assert convs == 0 and dots > 0  # a 2x2 map: matrix products on the CPU
    for platform in ("cuda", "tpu"):
        convs, dots = conv_ops(export.export(jax.jit(step), platforms=[platform])(*args))
        assert convs > 0 and dots == 0


def conv_ops(exported) -> tuple[int, int]:
    text = exported.mlir_module()
    return text.count("stablehlo.convolution"), text.count("stablehlo.dot_general")


def test_bad_arguments_raise_clear_errors():
    x, kernel = jnp.zeros((1, 4, 4, 6)), jnp.zeros((3, 3, 6, 4))
    with pytest.raises(ValueError, match="feature_group_count"):
        conv2d(x, kernel, 1, "SAME", 4)
    with pytest.raises(ValueError, match="expects 3 input features"):
        conv2d(x, jnp.zeros((3, 3, 3, 4)), 1, "SAME")
    with pytest.raises(ValueError, match="padding must be"):
        conv2d(x, kernel, 1, "FULL")
    with pytest.raises(ValueError, match="strides"):
        conv2d(x, kernel, 0, "SAME")
    with pytest.raises(ValueError, match="algorithms"):
        conv2d(x, kernel, 1, "SAME", algorithms=("xla", "im2col", "xla"))
    with pytest.raises(ValueError, match="algorithms"):
        conv2d(x, kernel, 1, "SAME", algorithms=("xla-stored", "xla", "xla"))
    with pytest.raises(ValueError, match="feature_group_count=1"):
        conv2d(x, jnp.zeros((3, 3, 3, 4)), 1, "SAME", 2, algorithms=("xla", "xla", "xla-stored"))
    with pytest.raises(ValueError, match="no bias"):
        Conv(4, 3, use_bias=True).init(jax.random.key(0), x)


# ------------------------------------------------------------------------- max pooling


def test_max_pool_matches_torch_with_ties_in_float64(x64):
    rng = np.random.RandomState(5)
    x = rng.standard_normal((2, 9, 10, 3))
    x[0, :4, :4, 0] = 1.5  # ties inside and across windows: the gradient goes to the first
    x[1, 2:6, 3:7, 1] = 0.0
    ct = rng.standard_normal((2, 5, 5, 3))
    y, vjp = jax.vjp(lambda x: max_pool(x, 3, 2, 1), jnp.asarray(x))
    (dx,) = vjp(jnp.asarray(ct))
    tx = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    ty = torch.nn.functional.max_pool2d(tx, 3, 2, 1)
    ty.backward(torch.tensor(ct.transpose(0, 3, 1, 2)))
    np.testing.assert_array_equal(y, ty.detach().numpy().transpose(0, 2, 3, 1))
    np.testing.assert_allclose(dx, tx.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-15,
                               atol=1e-15)


@pytest.mark.parametrize("window,stride,padding", [(3, 2, 1), (2, 2, 0), (3, 1, 1)])
def test_max_pool_matches_flax_max_pool(window, stride, padding):
    x = jnp.asarray(np.random.RandomState(6).standard_normal((2, 11, 8, 4)), jnp.float32)

    def flax_pool(x):
        return nn.max_pool(x, (window, window), (stride, stride), ((padding, padding),) * 2)

    y, vjp = jax.vjp(lambda x: max_pool(x, window, stride, padding), x)
    want_y, want_vjp = jax.vjp(flax_pool, x)
    ct = jnp.asarray(np.random.RandomState(7).standard_normal(y.shape), jnp.float32)
    np.testing.assert_array_equal(y, want_y)
    # Same routing; a position in two windows sums two gradients in another order.
    np.testing.assert_allclose(jax.jit(vjp)(ct)[0], want_vjp(ct)[0], rtol=1e-6, atol=1e-6)


def test_max_pool_uses_reduce_window_off_cpu_and_rejects_bad_windows():
    arg = jax.ShapeDtypeStruct((2, 8, 8, 4), jnp.float32)
    step = jax.jit(jax.grad(lambda x: max_pool(x, 3, 2, 1).sum()))
    assert "select_and_scatter" in export.export(step, platforms=["cuda"])(arg).mlir_module()
    assert "select_and_scatter" not in export.export(step, platforms=["cpu"])(arg).mlir_module()
    with pytest.raises(ValueError, match="padding"):
        max_pool(jnp.zeros((1, 4, 4, 1)), 3, 2, 2)
