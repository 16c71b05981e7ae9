"""torchvision-exact ResNets in Flax linen (NHWC).

Module names follow torchvision's state-dict keys (`layer1.0.conv1` is `layer1_0/conv1`), so
weight conversion is a renaming plus transposes. Padding is explicit and symmetric where
torchvision's is: Flax's 'SAME' pads asymmetrically for stride 2 and would shift every map.

The convolution, activation and max pool are module fields, as in flax's own ResNet
(examples/imagenet): plain Flax by default, so a backend's kernels plug in from outside
without this module importing them (`jaxsft.cpu.accelerate` swaps in XLA:CPU's). Any
replacement keeps the parameters ("kernel", HWIO, no bias), so variables are interchangeable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxsft.models.norm import batch_norm_train, normalize

ModuleDef = Any  # a flax.linen.Module class, or a partial of one

# torch's BatchNorm momentum 0.1 is Flax's 0.9: running = 0.9 * running + 0.1 * batch.
TORCH_BN_MOMENTUM = 0.1
BN_MOMENTUM = 1 - TORCH_BN_MOMENTUM
BN_EPSILON = 1e-5

# torchvision's init: kaiming_normal_(mode="fan_out", nonlinearity="relu"); "normal" is
# untruncated in jax.nn.initializers (its truncated one is "truncated_normal").
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch.nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
dense_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def max_pool(x: jax.Array, window: int = 3, stride: int = 2, padding: int = 0) -> jax.Array:
    """NHWC max pooling with symmetric -inf padding: torch.nn.functional.max_pool2d."""
    return nn.max_pool(x, (window, window), (stride, stride),
                       ((padding, padding), (padding, padding)))


def param_dtype_for(dtype: Any) -> Any:
    """Parameters stay float32 under reduced-precision compute; float64 compute keeps float64."""
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def dense_bias_init(fan_in: int):
    """torch.nn.Linear's bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)): needs the fan-in."""

    def init(key, shape, dtype=jnp.float32):
        bound = 1.0 / jnp.sqrt(fan_in)
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def classifier(num_classes: int, fan_in: int, dtype: Any = jnp.float32,
               name: str | None = "fc") -> nn.Dense:
    """The head, initialised as torch.nn.Linear; also used to re-initialise a loaded head."""
    return nn.Dense(num_classes, dtype=dtype, param_dtype=param_dtype_for(dtype),
                    kernel_init=dense_init, bias_init=dense_bias_init(fan_in), name=name)


class BatchNorm(nn.Module):
    """torch.nn.BatchNorm2d semantics in Flax.

    Differs from `flax.linen.BatchNorm` in one place that matters for parity: the running
    variance is updated with the unbiased batch variance (n / (n - 1)), as torch does, while
    the batch is normalised with the biased one. With `axis_name`, the statistics are those of
    the global batch across devices (two-pass: mean, then mean squared deviation). In training
    mode the gradient is the closed form torch uses (`jaxsft.models.norm`).
    """

    use_running_average: bool
    axis_name: str | None = None
    momentum: float = BN_MOMENTUM
    epsilon: float = BN_EPSILON
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        shape = (features,)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, shape, self.param_dtype)
        ra_var = self.variable("batch_stats", "var", jnp.ones, shape, self.param_dtype)
        scale = self.param("scale", nn.initializers.ones, shape, self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, shape, self.param_dtype)

        if self.use_running_average:
            return normalize(x, ra_mean.value, ra_var.value, scale, bias,
                             self.epsilon).astype(self.dtype)
        y, mean, var = batch_norm_train(x, scale, bias, self.epsilon, self.axis_name)
        n = x.size // features
        if self.axis_name is not None:
            n *= jax.lax.psum(1, self.axis_name)
        if not self.is_initializing():
            m = self.momentum
            ra_mean.value = m * ra_mean.value + (1 - m) * mean.astype(self.param_dtype)
            unbiased = var * (n / max(n - 1, 1))
            ra_var.value = m * ra_var.value + (1 - m) * unbiased.astype(self.param_dtype)
        return y.astype(self.dtype)


class _Block(nn.Module):
    """What every residual block is built from (positional order used by ResNet)."""

    planes: int
    stride: int = 1
    groups: int = 1
    base_width: int = 64
    dtype: Any = jnp.float32
    train: bool = False
    axis_name: str | None = None
    conv: ModuleDef = nn.Conv
    act: Callable[[jax.Array], jax.Array] = nn.relu
    bn_momentum: float = TORCH_BN_MOMENTUM


class BasicBlock(_Block):
    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv, norm = _layers(self.conv, self.dtype, self.train, self.axis_name,
                             self.bn_momentum)
        act = self.act
        out = act(norm(name="bn1")(conv(self.planes, 3, self.stride, name="conv1")(x)))
        out = norm(name="bn2")(conv(self.planes, 3, 1, name="conv2")(out))
        return act(out + _shortcut(self, x, conv, norm))


class Bottleneck(_Block):
    """ResNet v1.5: the stride sits on the 3x3 convolution, as in torchvision."""

    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv, norm = _layers(self.conv, self.dtype, self.train, self.axis_name,
                             self.bn_momentum)
        act = self.act
        width = int(self.planes * (self.base_width / 64.0)) * self.groups
        out = act(norm(name="bn1")(conv(width, 1, 1, name="conv1")(x)))
        out = conv(width, 3, self.stride, groups=self.groups, name="conv2")(out)
        out = act(norm(name="bn2")(out))
        out = norm(name="bn3")(conv(self.planes * 4, 1, 1, name="conv3")(out))
        return act(out + _shortcut(self, x, conv, norm))


def _layers(conv_def: ModuleDef, dtype: Any, train: bool, axis_name: str | None,
            bn_momentum: float):
    """Conv and BatchNorm factories with torchvision's padding, init and BN constants
    (`bn_momentum` in torch's convention)."""
    pdtype = param_dtype_for(dtype)

    def conv(features: int, k: int, stride: int, groups: int = 1, name: str | None = None):
        pad = k // 2  # torchvision: 7x7 pad 3, 3x3 pad 1, 1x1 pad 0, all symmetric
        return conv_def(features=features, kernel_size=(k, k), strides=(stride, stride),
                        padding=((pad, pad), (pad, pad)), feature_group_count=groups,
                        use_bias=False, dtype=dtype, param_dtype=pdtype, kernel_init=conv_init,
                        name=name)

    def norm(name: str | None = None):
        return BatchNorm(use_running_average=not train, axis_name=axis_name,
                         momentum=1 - bn_momentum, dtype=dtype, param_dtype=pdtype, name=name)

    return conv, norm


def _shortcut(block: nn.Module, x: jax.Array, conv, norm) -> jax.Array:
    out_features = block.planes * block.expansion
    if block.stride == 1 and x.shape[-1] == out_features:
        return x
    return norm(name="downsample_1")(conv(out_features, 1, block.stride, name="downsample_0")(x))


class ResNet(nn.Module):
    """ResNet, Wide ResNet and ResNeXt as torchvision builds them.

    `__call__(x, train, axis_name)`: x is NHWC; `train=True` uses batch statistics and needs
    `mutable=["batch_stats"]`; `axis_name` synchronises those statistics across devices.
    `conv` (called as `flax.linen.Conv` with `use_bias=False`), `act` and `pool` (called as
    `max_pool(x, window, stride, padding)`) are where backend-specific kernels plug in.
    `bn_momentum` is torch's BatchNorm momentum (0.1: running = 0.9 running + 0.1 batch).
    """

    block: type[nn.Module]
    layers: Sequence[int]
    num_classes: int = 1000
    groups: int = 1
    width_per_group: int = 64
    dtype: Any = jnp.float32
    conv: ModuleDef = nn.Conv
    act: Callable[[jax.Array], jax.Array] = nn.relu
    pool: Callable[..., jax.Array] = max_pool
    bn_momentum: float = TORCH_BN_MOMENTUM

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False,
                 axis_name: str | None = None) -> jax.Array:
        conv, norm = _layers(self.conv, self.dtype, train, axis_name, self.bn_momentum)
        x = x.astype(self.dtype)
        x = self.act(norm(name="bn1")(conv(64, 7, 2, name="conv1")(x)))
        x = self.pool(x, window=3, stride=2, padding=1)
        for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), self.layers), 1):
            for i in range(blocks):
                stride = 2 if stage > 1 and i == 0 else 1
                x = self.block(planes, stride, self.groups, self.width_per_group, self.dtype,
                               train, axis_name, conv=self.conv, act=self.act,
                               bn_momentum=self.bn_momentum, name=f"layer{stage}_{i}")(x)
        x = x.mean(axis=(1, 2))
        x = classifier(self.num_classes, x.shape[-1], self.dtype)(x)
        return x.astype(jnp.promote_types(x.dtype, jnp.float32))
