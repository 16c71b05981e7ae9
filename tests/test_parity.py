"""Parity with the seed's PyTorch loop: `model.train()`, `CrossEntropyLoss`, `SGD`, step.

torchvision resnet18 with a fixed seed (BatchNorm affine and running statistics randomised,
as a pretrained network's are), free-running for 10 steps on the same batches in both
frameworks. In float64 every step's loss, the final parameters and the final running
statistics agree to a relative 1e-10; in float32 rounding flips ReLU/max-pool near-ties, so
only the losses are compared, loosely. The model is the one `jaxsft.train` runs on the CPU,
`jaxsft.cpu.accelerate`d; the plain Flax model is checked in float64 with the seed's settings.

40x40 inputs: layer4 sees 2x2 maps, so its BatchNorm normalises 32 values per channel. At
32x32 (1x1 maps, 8 values) the dynamics amplify rounding ~10x a step and float64 runs part by
~1e-10 after 10 steps; at 40x40 they agree to ~1e-14.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from helpers import assert_trees_close, randomize_batchnorm

from jaxsft import cpu
from jaxsft.config import OptimConfig
from jaxsft.models import create_model
from jaxsft.optim import create_optimizer
from jaxsft.state import TrainState
from jaxsft.steps import train_step
from jaxsft.weights import from_torch_state_dict, load_weights

STEPS = 10
BATCH = 8
SIZE = 40
CLASSES = 10


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def seed_run(tmp_path_factory):
    """The seed's network saved as a float64 state dict file, and STEPS batches (NHWC)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=CLASSES).double()
    randomize_batchnorm(model)
    rs = np.random.RandomState(0)
    images = rs.randn(STEPS, BATCH, SIZE, SIZE, 3)
    labels = rs.randint(0, CLASSES, (STEPS, BATCH))
    path = tmp_path_factory.mktemp("seed") / "resnet18_seed.pth"
    torch.save(model.state_dict(), path)
    return path, images, labels


def torch_seed_loop(path, images, labels, *, dtype, lr, momentum=0.9, weight_decay=0.0,
                    nesterov=False, label_smoothing=0.0):
    """The seed's loop, verbatim but for the hyperparameters."""
    model = torchvision.models.resnet18(num_classes=CLASSES).to(dtype)
    model.load_state_dict(torch.load(path))  # copied into `dtype` tensors
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                                weight_decay=weight_decay, nesterov=nesterov)
    model.train()
    losses = []
    for x, y in zip(images, labels):
        inputs = torch.from_numpy(x).permute(0, 3, 1, 2).to(dtype)
        outputs = model(inputs)
        loss = criterion(outputs, torch.from_numpy(y))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return np.array(losses), model.state_dict()


def jax_loop(path, images, labels, *, dtype, cfg: OptimConfig, label_smoothing=0.0,
             accelerated=True):
    variables = load_weights(path, arch="resnet18", dtype=dtype)
    model = create_model("resnet18", num_classes=CLASSES, dtype=dtype)
    if accelerated:
        model = cpu.accelerate(model)
    tx, _ = create_optimizer(cfg, total_steps=STEPS, steps_per_epoch=STEPS, batch_size=BATCH)
    state = TrainState.create(apply_fn=model.apply, params=variables["params"],
                              batch_stats=variables["batch_stats"], tx=tx)
    step = jax.jit(functools.partial(train_step, label_smoothing=label_smoothing))
    losses = []
    for x, y in zip(images, labels):
        state, metrics = step(state, {"image": jnp.asarray(x, dtype), "label": jnp.asarray(y)})
        assert bool(metrics["finite"])
        losses.append(float(metrics["loss"]))
    return np.array(losses), state



SEED_CASES = {
    "seed": dict(lr=0.01, momentum=0.9),
    "weight-decay-nesterov": dict(lr=0.01, momentum=0.9, weight_decay=5e-2, nesterov=True),
    "label-smoothing": dict(lr=0.01, momentum=0.9, label_smoothing=0.1),
}


F64_RUNS = [*((case, True) for case in SEED_CASES), ("seed", False)]


@pytest.mark.parametrize("case, accelerated", F64_RUNS,
                         ids=[f"{c}-{'accelerated' if a else 'plain'}" for c, a in F64_RUNS])
def test_float64_parity_with_seed_loop(case, accelerated, seed_run, x64):
    path, images, labels = seed_run
    opts = SEED_CASES[case]
    cfg = OptimConfig(lr=opts["lr"], momentum=opts["momentum"],
                      weight_decay=opts.get("weight_decay", 0.0),
                      nesterov=opts.get("nesterov", False))
    ls = opts.get("label_smoothing", 0.0)
    torch_losses, torch_final = torch_seed_loop(path, images, labels,
                                                dtype=torch.float64, **opts)
    jax_losses, state = jax_loop(path, images, labels, dtype=jnp.float64, cfg=cfg,
                                 label_smoothing=ls, accelerated=accelerated)
    np.testing.assert_allclose(jax_losses, torch_losses, rtol=1e-10)
    final = from_torch_state_dict(torch_final, "resnet18")
    initial = load_weights(path, arch="resnet18")
    assert_trees_close(state.params, final["params"], rtol=1e-10)
    assert_trees_close(state.batch_stats, final["batch_stats"], rtol=1e-10)
    for collection, module, leaf in [("params", "fc", "kernel"), ("batch_stats", "bn1", "var")]:
        moved = final[collection][module][leaf] - initial[collection][module][leaf]
        assert np.abs(moved).max() > 1e-4  # the comparison is not of two unchanged networks
    assert int(state.step) == STEPS


def test_float32_sanity(seed_run):
    """64x64 as measured in the issue: losses part by ~1e-6 to ~2e-3 over 5 steps."""
    path, _, _ = seed_run
    rs = np.random.RandomState(0)
    images = rs.randn(5, BATCH, 64, 64, 3).astype(np.float32)
    labels = rs.randint(0, CLASSES, (5, BATCH))
    torch_losses, _ = torch_seed_loop(path, images, labels, dtype=torch.float32, lr=1e-3)
    jax_losses, state = jax_loop(path, images, labels, dtype=jnp.float32,
                                 cfg=OptimConfig(lr=1e-3, momentum=0.9))
    assert jax.tree.leaves(state.params)[0].dtype == jnp.float32
    np.testing.assert_allclose(jax_losses, torch_losses, atol=5e-3)
