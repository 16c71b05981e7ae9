"""FLOPs of a model, counted per layer from its architecture and input size: honest MFU.

XLA's cost analysis of a *compiled* GPU step skips the cuDNN convolutions (custom calls), so
it reports ~0.44 GFLOP per ResNet-50 image where the model does ~24.6 (jax#16008, #22249,
#17912); on the CPU it leaves out the multiply-adds that fall on convolution padding. MFU is
defined on the model's FLOPs (PaLM's "model FLOPs utilisation"), so they are counted here from
the layers themselves, the way the usual tables (torchvision's GFLOPS column, fvcore, torch's
FlopCounterMode) count them:
- a convolution: 2 * Ho * Wo * Cout * (Cin / groups) * kh * kw per image (every tap, padding
  included: the dense count);
- a dense layer: 2 * in * out per example;
- a training step: 3 x the forward (forward, input gradient, kernel gradient: each the same
  multiply-adds), the standard convention (ResNet-50 at 224: 3 x 8.2 = 24.6 GFLOP/image).
  The stem's input gradient is not needed, so the true count is a little lower (about 1% for
  ResNet-50), reported beside it as `train_step_exact`.
BatchNorm's element-wise work is a separate line (`elementwise_forward`, not in MFU): 7 FLOPs
per element (sum, centred square, sum; subtract, multiply by 1/std, scale, shift). ReLU,
residual adds and pooling are not counted at all (about as much again; <1% of the total).

The counts come from tracing the model abstractly (`jax.eval_shape`, nothing computed) with
Flax's method interceptor, so any architecture of jaxsft.models (and any module with a
flax.linen.Conv-like `features` / `kernel_size` / `feature_group_count`) is counted at any
input size. No TensorFlow, no torch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

BN_FLOPS_PER_ELEMENT = 7
SOURCE = "model-count"


@dataclasses.dataclass(frozen=True)
class Layer:
    """One counted layer: its module path, kind and forward FLOPs per example."""

    name: str
    kind: str  # "conv", "dense" or "batchnorm"
    in_shape: tuple[int, ...]  # per example, without the batch axis
    out_shape: tuple[int, ...]
    flops: int  # forward, per example


def _conv_flops(module: Any, x: Any, y: Any) -> int:
    groups = getattr(module, "feature_group_count", 1)
    taps = math.prod(module.kernel_size)
    return 2 * math.prod(y.shape[1:-1]) * y.shape[-1] * (x.shape[-1] // groups) * taps


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Dense):
        return "dense"
    if all(hasattr(module, a) for a in ("features", "kernel_size")):
        return "conv"
    if "batchnorm" in type(module).__name__.lower():
        return "batchnorm"
    return None


def layer_table(model: nn.Module, image_size: int, channels: int = 3) -> list[Layer]:
    """Every convolution, dense and BatchNorm layer of `model` on one [size, size, channels]
    image, in call order, with its forward FLOPs (traced, nothing computed)."""
    layers: list[Layer] = []

    def count(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        kind = _kind(context.module) if context.method_name == "__call__" else None
        if kind is not None:
            x = args[0]
            if kind == "conv":
                flops = _conv_flops(context.module, x, out)
            elif kind == "dense":
                flops = 2 * x.shape[-1] * out.shape[-1]
            else:
                flops = BN_FLOPS_PER_ELEMENT * math.prod(out.shape[1:])
            name = "/".join(context.module.path) or type(context.module).__name__
            layers.append(Layer(name, kind, tuple(x.shape[1:]), tuple(out.shape[1:]), flops))
        return out

    def init(x):
        with nn.intercept_methods(count):
            return model.init(jax.random.key(0), x, train=False)

    jax.eval_shape(init, jax.ShapeDtypeStruct((1, image_size, image_size, channels),
                                              jnp.float32))
    return layers


def count(model: nn.Module | str, image_size: int, channels: int = 3,
          num_classes: int = 1000) -> dict[str, Any]:
    """FLOPs per example of `model` (a module, or a jaxsft architecture name): forward
    (convolutions + dense), the 3x training-step convention, the exact training step, and
    the element-wise BatchNorm line; with the source named."""
    if isinstance(model, str):
        from jaxsft import create_model

        model = create_model(model, num_classes=num_classes)
    table = layer_table(model, image_size, channels)
    matmul = [layer for layer in table if layer.kind in ("conv", "dense")]
    forward = sum(layer.flops for layer in matmul)
    first = matmul[0].flops if matmul and matmul[0].kind == "conv" else 0
    return {
        "source": SOURCE,
        "image_size": image_size,
        "channels": channels,
        "forward": forward,
        "train_step": 3 * forward,
        "train_step_exact": 3 * forward - first,  # no input gradient for the stem
        "elementwise_forward": sum(x.flops for x in table if x.kind == "batchnorm"),
        "conv_layers": sum(layer.kind == "conv" for layer in table),
        "dense_layers": sum(layer.kind == "dense" for layer in table),
        "convention": "2 FLOPs per multiply-add, every convolution tap counted (padding "
                      "included); train step = 3 x forward; BatchNorm/ReLU/pool not in it",
    }


def mfu_flops(model_count: float | None, xla_flops: float | None) -> tuple[float | None, str]:
    """The FLOPs per step MFU is computed from, and their source: the model count when there
    is one (MFU's definition), else XLA's cost analysis of the compiled step."""
    if model_count:
        return model_count, SOURCE
    if xla_flops:
        return xla_flops, "xla-cost-analysis"
    return None, "none"


def lowered_flops(lowered: Any) -> float | None:
    """XLA's estimate on the *unoptimised* HLO of a lowered step (`jax.jit(f).lower(...)`):
    the convolutions are still plain HLO there, so they are counted (padding taps excluded);
    a cross-check of the model count."""
    try:
        analysis = lowered.cost_analysis()
    except Exception:  # not every backend or jax version has it
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None
