"""An explicit registry: architecture name -> ResNet constructor arguments."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from jaxsft.models.resnet import BasicBlock, BatchNorm, Bottleneck, ResNet

__all__ = ["ARCHITECTURES", "BatchNorm", "ResNet", "create_model", "list_models"]

# Same depths, widths and groups as torchvision.models.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "resnet18": dict(block=BasicBlock, layers=(2, 2, 2, 2)),
    "resnet34": dict(block=BasicBlock, layers=(3, 4, 6, 3)),
    "resnet50": dict(block=Bottleneck, layers=(3, 4, 6, 3)),
    "resnet101": dict(block=Bottleneck, layers=(3, 4, 23, 3)),
    "resnet152": dict(block=Bottleneck, layers=(3, 8, 36, 3)),
    "wide_resnet50_2": dict(block=Bottleneck, layers=(3, 4, 6, 3), width_per_group=128),
    "wide_resnet101_2": dict(block=Bottleneck, layers=(3, 4, 23, 3), width_per_group=128),
    "resnext50_32x4d": dict(block=Bottleneck, layers=(3, 4, 6, 3), groups=32, width_per_group=4),
    "resnext101_32x8d": dict(block=Bottleneck, layers=(3, 4, 23, 3), groups=32,
                             width_per_group=8),
    "resnext101_64x4d": dict(block=Bottleneck, layers=(3, 4, 23, 3), groups=64,
                             width_per_group=4),
}


def list_models() -> list[str]:
    return sorted(ARCHITECTURES)


def create_model(name: str, num_classes: int = 1000, dtype: Any = jnp.float32,
                 bn_momentum: float = 0.1) -> ResNet:
    """A Flax ResNet taking NHWC float images; `dtype` is the compute dtype, `bn_momentum`
    torch's BatchNorm momentum (0.1, torch's default).

    Parameters are float32 whatever the compute dtype (bf16 on accelerators), except that
    float64 compute (JAX x64 mode) keeps float64 parameters, for exact parity tests.
    """
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    if num_classes <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if not 0 < bn_momentum <= 1:
        raise ValueError(f"bn_momentum must be in (0, 1], got {bn_momentum}")
    return ResNet(num_classes=num_classes, dtype=jnp.dtype(dtype).type, bn_momentum=bn_momentum,
                  **ARCHITECTURES[name])
