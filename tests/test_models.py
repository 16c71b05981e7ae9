"""Every architecture against torchvision itself: weights loaded with load_weights, then
eval logits (224x224 and an odd size), train-mode outputs and BatchNorm running statistics;
the plain Flax model and `jaxsft.cpu.accelerate(model)` (XLA:CPU's kernels) alike.

Tolerances, relative to the largest |value| of the tensor compared: torch's own float32
eval logits differ from its float64 ones by up to ~1e-6 on these models, so float32 eval
allows 1e-5. In train mode, normalising by statistics of a 2-image batch amplifies rounding:
torch's own float32 logits then differ from its float64 ones by ~3e-5 on bottleneck models
(running statistics by ~4e-6), so float32 train allows 1e-4 (statistics 2e-5). Float64
comparisons allow 1e-10, far below any float32 rounding.
"""

import os
import subprocess
import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from helpers import assert_trees_close
from safetensors.torch import save_file

from jaxsft import cpu
from jaxsft.models import create_model, list_models
from jaxsft.models.resnet import Bottleneck, ResNet
from jaxsft.weights import load_weights, to_torch_state_dict

F32_TOL = 1e-5
F32_TRAIN_TOL = 1e-4
F32_STATS_TOL = 2e-5
F64_TOL = 1e-10
ODD_SIZE = (97, 113)
TRAIN_ARCHS = ["resnet18", "resnext50_32x4d"]  # basic blocks; bottleneck + groups + downsample
KERNELS = {"plain": lambda model: model, "accelerated": cpu.accelerate}


def torchvision_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """torchvision's model with a fixed seed and non-trivial BatchNorm statistics, in eval mode.

    The running statistics come from one train-mode batch (so activations keep sane scales
    through 50 blocks), then are perturbed at random, as are the affine parameters.
    """
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)()
    g = torch.Generator().manual_seed(seed + 1)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in norms:
        bn.momentum = None  # cumulative average: after one batch, the batch statistics
        bn.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64, generator=g))
        for bn in norms:
            n = bn.num_features
            bn.running_mean.add_(0.1 * bn.running_var.sqrt() * torch.randn(n, generator=g))
            bn.running_var.mul_(torch.empty(n).uniform_(0.5, 2.0, generator=g))
            bn.weight.uniform_(0.5, 1.5, generator=g)
            bn.bias.normal_(0.0, 0.2, generator=g)
            bn.momentum = 0.1
            bn.num_batches_tracked.fill_(7)
    return model.eval()


def nhwc(x: torch.Tensor) -> jnp.ndarray:
    return jnp.asarray(x.permute(0, 2, 3, 1).numpy())


def rel_err(ours, theirs) -> float:
    theirs = np.asarray(theirs, np.float64)
    return float(np.abs(np.asarray(ours, np.float64) - theirs).max() / np.abs(theirs).max())


@pytest.mark.parametrize("arch", list_models())
def test_eval_logits_match_torchvision(arch, tmp_path):
    reference = torchvision_model(arch)
    state_dict = reference.state_dict()
    torch.save(state_dict, tmp_path / "w.pth")
    save_file({k: v.contiguous() for k, v in state_dict.items()}, tmp_path / "w.safetensors")
    loaded = [load_weights(tmp_path / "w.pth", arch),
              load_weights(tmp_path / "w.safetensors", arch)]
    apply = jax.jit(partial(cpu.accelerate(create_model(arch)).apply, train=False))
    g = torch.Generator().manual_seed(2)
    for size in [(224, 224), ODD_SIZE]:
        x = torch.randn(1, 3, *size, generator=g)
        with torch.no_grad():
            expected = reference(x).numpy()
        for variables in loaded:
            logits = apply(variables, nhwc(x))
            assert logits.shape == (1, 1000) and logits.dtype == jnp.float32
            assert rel_err(logits, expected) < F32_TOL, (arch, size)


def _train_forward_check(arch, tmp_path, dtype, tol, train_tol, stats_tol, kernels="plain"):
    """Eval then one train-mode forward, each against torchvision's, at the same precision."""
    torch_dtype = torch.float64 if dtype == jnp.float64 else torch.float32
    reference = torchvision_model(arch).to(torch_dtype)
    torch.save(reference.state_dict(), tmp_path / "w.pth")
    variables = load_weights(tmp_path / "w.pth", arch)  # the file's dtype is kept
    assert all(v.dtype == dtype for v in jax.tree.leaves(variables))
    model = KERNELS[kernels](create_model(arch, dtype=dtype))
    x = torch.randn(2, 3, 65, 71, generator=torch.Generator().manual_seed(3), dtype=torch_dtype)

    with torch.no_grad():
        expected_eval = reference(x).numpy()
        expected_train = reference.train()(x).numpy()
    logits = model.apply(variables, nhwc(x))
    assert logits.dtype == dtype
    assert rel_err(logits, expected_eval) < tol

    logits, updates = model.apply(variables, nhwc(x), train=True, mutable=["batch_stats"])
    assert logits.dtype == dtype
    assert rel_err(logits, expected_train) < train_tol
    ours = to_torch_state_dict({"params": variables["params"], **updates})
    stats = [k for k in ours if k.endswith(("running_mean", "running_var"))]
    assert len(stats) == 2 * sum(isinstance(m, torch.nn.BatchNorm2d) for m in reference.modules())
    for key, theirs in reference.state_dict().items():
        if key in stats:
            assert rel_err(ours[key], theirs.numpy()) < stats_tol, key


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("arch", TRAIN_ARCHS)
def test_train_forward_matches_torchvision_float64(arch, kernels, tmp_path, x64):
    _train_forward_check(arch, tmp_path, jnp.float64, F64_TOL, F64_TOL, F64_TOL, kernels)


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("arch", TRAIN_ARCHS)
def test_train_forward_matches_torchvision_float32(arch, kernels, tmp_path):
    _train_forward_check(arch, tmp_path, jnp.float32, F32_TOL, F32_TRAIN_TOL, F32_STATS_TOL,
                         kernels)


@pytest.mark.parametrize("arch", TRAIN_ARCHS)
def test_accelerated_model_has_the_same_variables_and_function(arch, x64):
    model = create_model(arch, num_classes=7, dtype=jnp.float64)
    fast = cpu.accelerate(model)
    x = jnp.asarray(np.random.RandomState(5).standard_normal((2, 37, 33, 3)))
    variables = model.init(jax.random.key(0), x)
    fast_variables = fast.init(jax.random.key(0), x)
    assert_trees_close(fast_variables, variables, rtol=0)  # same tree, shapes and values
    assert jax.tree.map(lambda v: v.dtype, fast_variables) == jax.tree.map(
        lambda v: v.dtype, variables)
    assert rel_err(fast.apply(variables, x), model.apply(variables, x)) < 1e-12
    fast_logits, fast_stats = fast.apply(variables, x, train=True, mutable=["batch_stats"])
    logits, stats = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert rel_err(fast_logits, logits) < 1e-12
    assert_trees_close(fast_stats, stats, rtol=1e-12)


def test_accelerated_gradients_are_the_plain_models(x64):
    # Every CPU formulation at 37x33 in float64: the stem and layer1 on XLA's convolution with
    # the stored kernel gradient, 1x1 and small maps as matrix products, grouped ones on XLA;
    # the ReLU and max pool gradients from stored values.
    model = ResNet(block=Bottleneck, layers=(1, 1, 1, 1), groups=2, width_per_group=32,
                   num_classes=7, dtype=jnp.float64)
    x = jnp.asarray(np.random.RandomState(6).standard_normal((2, 37, 33, 3)))
    variables = model.init(jax.random.key(0), x)

    def grads(model, variables, x):
        def loss(params):
            logits, _ = model.apply({**variables, "params": params}, x, train=True,
                                    mutable=["batch_stats"])
            return jnp.sum(jnp.sin(logits))

        return jax.grad(loss)(variables["params"])

    fast = cpu.accelerate(model)
    for m, cpu_kernels in ((model, False), (fast, True)):  # lax.platform_dependent's choice
        assert ("platform_index" in str(jax.make_jaxpr(partial(grads, m))(variables, x))
                ) == cpu_kernels
    plain = jax.jit(partial(grads, model))(variables, x)  # arguments, not constants to fold
    assert_trees_close(jax.jit(partial(grads, fast))(variables, x), plain, rtol=1e-10)


IMPORT_CHECK = """
import os, sys, warnings
import jax, jax.numpy as jnp, flax.linen
environ, filters, flags = dict(os.environ), list(warnings.filters), jax.config.values.copy()
import jaxsft, jaxsft.models
model = jaxsft.create_model("resnet50", num_classes=3)
unchanged = [dict(os.environ) == environ, warnings.filters == filters,
             jax.config.values == flags]
jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
print(sorted(m for m in sys.modules if m.startswith("jaxsft.cpu")), unchanged)
"""


def test_the_plain_model_loads_no_cpu_code_and_importing_jaxsft_changes_nothing():
    out = subprocess.run([sys.executable, "-c", IMPORT_CHECK], check=True, text=True,
                         capture_output=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}).stdout
    assert out.split() == ["[]", "[True,", "True,", "True]"], out


def test_float64_model_has_float64_params(x64):
    model = create_model("resnet50", num_classes=3, dtype=jnp.float64)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float64)}


def test_bfloat16_compute_keeps_float32_params(tmp_path):
    reference = torchvision_model("resnet18")
    torch.save(reference.state_dict(), tmp_path / "w.pth")
    variables = load_weights(tmp_path / "w.pth", "resnet18")
    model = create_model("resnet18", dtype=jnp.bfloat16)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}

    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    # The program an accelerator runs: 20 convolutions, all computing in bfloat16. (On the CPU
    # the accelerated model computes some convolutions as matrix products, jaxsft.cpu.conv;
    # checked by the CPU export.)
    for platform, ops, kernels in (("cuda", ("convolution",), "plain"),
                                   ("cpu", ("convolution", "dot_general"), "accelerated")):
        forward = jax.jit(partial(KERNELS[kernels](model).apply, train=False))
        mlir = jax.export.export(forward, platforms=[platform])(variables, nhwc(x)).mlir_module()
        results = [line.rsplit("->", 1)[-1] for line in mlir.splitlines()
                   if any(f"stablehlo.{op}" in line for op in ops)]
        assert results and all("bf16" in r for r in results), platform
        if platform == "cuda":
            assert len(results) == 20

    logits = model.apply(variables, nhwc(x))
    with torch.no_grad():
        expected = reference(x).numpy()
    assert logits.dtype == jnp.float32
    assert rel_err(logits, expected) < 5e-2  # bfloat16 keeps ~3 significant digits


def test_unknown_model_lists_known_ones():
    with pytest.raises(ValueError, match="resnet5") as err:
        create_model("resnet5")
    assert all(name in str(err.value) for name in list_models())
    assert len(list_models()) == 10
