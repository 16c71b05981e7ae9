"""train_step / eval_step options against torch (float64), on a small torchvision ResNet.

The network is torchvision's `ResNet(BasicBlock, [1, 1, 1, 1])` (every part of a ResNet-18,
one block a stage: compiles in seconds) with randomised BatchNorm affine parameters and
running statistics, at 16x16, batch 16. Exactness is tested in float64, where a correct
implementation agrees with torch to ~1e-15.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from helpers import assert_trees_close, randomize_batchnorm
from torchvision.models.resnet import BasicBlock as TorchBasicBlock
from torchvision.models.resnet import ResNet as TorchResNet

from jaxsft.config import OptimConfig
from jaxsft.models.resnet import BasicBlock, ResNet, param_dtype_for
from jaxsft.optim import create_optimizer
from jaxsft.state import TrainState
from jaxsft.steps import eval_step, train_step

CLASSES = 10
BATCH = 16
SIZE = 16
SGD = OptimConfig(lr=0.05, momentum=0.9, weight_decay=1e-2)

# One jitted step for the whole module: calls with the same tx and options reuse its compile.
step_fn = jax.jit(train_step, static_argnames=("axis_name", "label_smoothing", "bn_mode",
                                                "accum_steps", "learning_rate_fn"))
eval_fn = jax.jit(eval_step)


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def net():
    """The torch network's float64 state dict and batches (NHWC images, labels)."""
    torch.manual_seed(0)
    model = TorchResNet(TorchBasicBlock, [1, 1, 1, 1], num_classes=CLASSES).double()
    randomize_batchnorm(model)
    rs = np.random.RandomState(0)
    images = rs.randn(3, BATCH, SIZE, SIZE, 3)
    labels = rs.randint(0, CLASSES, (3, BATCH))
    return {k: v.clone() for k, v in model.state_dict().items()}, images, labels


@pytest.fixture(scope="module")
def sgd():
    """One optimizer object shared by the tests, so that their steps share a compile."""
    return create_optimizer(SGD, total_steps=10, steps_per_epoch=10, batch_size=BATCH)


def to_flax(state_dict: dict, dtype=jnp.float64) -> dict:
    """torchvision state dict -> {"params", "batch_stats"}: jaxsft.load_weights knows only
    registered architectures, and this one-block-a-stage ResNet is not one."""
    variables: dict = {"params": {}, "batch_stats": {}}
    for key, tensor in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        *modules, leaf = key.split(".")
        path, i = [], 0
        while i < len(modules):  # layer1.0 -> layer1_0, downsample.1 -> downsample_1
            if modules[i].startswith(("layer", "downsample")):
                path.append(f"{modules[i]}_{modules[i + 1]}")
                i += 2
            else:
                path.append(modules[i])
                i += 1
        value = tensor.detach().numpy()
        collection, name = {
            "weight": ("params", {4: "kernel", 2: "kernel", 1: "scale"}[value.ndim]),
            "bias": ("params", "bias"),
            "running_mean": ("batch_stats", "mean"),
            "running_var": ("batch_stats", "var"),
        }[leaf]
        value = {4: lambda v: v.transpose(2, 3, 1, 0), 2: lambda v: v.T}.get(
            value.ndim, lambda v: v)(value)
        node = variables[collection]
        for p in path:
            node = node.setdefault(p, {})
        node[name] = jnp.array(value, dtype)
    return variables


@functools.cache
def flax_model(dtype) -> ResNet:
    """One module per dtype: a state's apply_fn is part of the jit cache key."""
    return ResNet(block=BasicBlock, layers=(1, 1, 1, 1), num_classes=CLASSES, dtype=dtype)


def new_state(state_dict: dict, tx, dtype=jnp.float64) -> TrainState:
    model = flax_model(dtype)
    variables = to_flax(state_dict, param_dtype_for(dtype))
    return TrainState.create(apply_fn=model.apply, params=variables["params"],
                             batch_stats=variables["batch_stats"], tx=tx)


def torch_model(state_dict: dict, dtype=torch.float64) -> torch.nn.Module:
    model = TorchResNet(TorchBasicBlock, [1, 1, 1, 1], num_classes=CLASSES).to(dtype)
    model.load_state_dict(state_dict)
    return model


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def run_jax(state, images, labels, masks=None, **options):
    losses, all_metrics = [], []
    for i, (x, y) in enumerate(zip(images, labels)):
        batch = {"image": jnp.asarray(x), "label": jnp.asarray(y)}
        if masks is not None:
            batch["mask"] = jnp.asarray(masks[i])
        state, metrics = step_fn(state, batch, **options)
        losses.append(float(metrics["loss"]))
        all_metrics.append(jax.device_get(metrics))
    return state, np.array(losses), all_metrics



def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def torch_sgd(params, lr=SGD.lr):
    return torch.optim.SGD(params, lr=lr, momentum=SGD.momentum, weight_decay=SGD.weight_decay)


def torch_frozen_bn_loop(model, optimizer, images, labels) -> np.ndarray:
    """torch training with the model in eval mode (running statistics, not updated)."""
    model.eval()
    losses = []
    for x, y in zip(images, labels):
        loss = torch.nn.functional.cross_entropy(model(nchw(x)), torch.from_numpy(y))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return np.array(losses)


# ------------------------------------------------------------------------- BatchNorm modes


def test_frozen_bn_matches_torch_training_in_eval_mode(net, sgd, x64):
    """bn_mode="frozen" is torch's `model.eval()` during training; statistics stay put."""
    state_dict, images, labels = net
    state0 = new_state(state_dict, sgd[0])
    state, losses, _ = run_jax(state0, images, labels, bn_mode="frozen")

    model = torch_model(state_dict)
    torch_losses = torch_frozen_bn_loop(model, torch_sgd(model.parameters()), images, labels)
    np.testing.assert_allclose(losses, torch_losses, rtol=1e-10)
    assert_trees_close(state.params, to_flax(model.state_dict())["params"])
    assert_trees_equal(state.batch_stats, state0.batch_stats)


def test_accumulation_4x4_equals_one_batch_of_16_with_frozen_bn(net, sgd, x64):
    state_dict, images, labels = net
    state0 = new_state(state_dict, sgd[0])
    whole, losses, metrics = run_jax(state0, images, labels, bn_mode="frozen")
    accum, accum_losses, accum_metrics = run_jax(state0, images, labels, bn_mode="frozen",
                                                 accum_steps=4)
    np.testing.assert_allclose(accum_losses, losses, rtol=1e-10)
    assert_trees_close(accum.params, whole.params)
    assert_trees_equal(accum.batch_stats, state0.batch_stats)
    for a, b in zip(accum_metrics, metrics):
        for key in ("top1", "top5", "count"):
            assert a[key] == b[key], key
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-10)


def test_accumulation_in_train_mode_matches_torch_micro_batch_loop(net, sgd, x64):
    """With BatchNorm in train mode each micro-batch has its own statistics, as in torch's
    accumulation loop (forward/backward per micro-batch, loss / steps, one optimizer.step).

    Two micro-batches of 8: BatchNorm over 4 values (1x1 maps) amplifies rounding ~100x
    more, which would leave this float64 comparison a thin margin."""
    state_dict, images, labels = net
    state, losses, _ = run_jax(new_state(state_dict, sgd[0]), images, labels, accum_steps=2)

    model = torch_model(state_dict).train()
    optimizer = torch_sgd(model.parameters())
    torch_losses = []
    for x, y in zip(images, labels):
        optimizer.zero_grad()
        total = 0.0
        for xm, ym in zip(np.split(x, 2), np.split(y, 2)):
            loss = torch.nn.functional.cross_entropy(model(nchw(xm)), torch.from_numpy(ym)) / 2
            loss.backward()
            total += loss.item()
        optimizer.step()
        torch_losses.append(total)
    final = to_flax(model.state_dict())
    np.testing.assert_allclose(losses, torch_losses, rtol=1e-10)
    assert_trees_close(state.params, final["params"])
    assert_trees_close(state.batch_stats, final["batch_stats"])


# ------------------------------------------------------------------------- masks and eval


def padded(images, labels, rs):
    """Each batch's last 5 rows replaced by junk, the rows then shuffled; mask marks real."""
    masks = np.ones(labels.shape)
    masks[:, -5:] = 0
    images, labels = images.copy(), labels.copy()
    images[:, -5:] = 100 * rs.randn(*images[:, -5:].shape)
    labels[:, -5:] = -1  # also out of range: must not matter
    order = np.stack([rs.permutation(BATCH) for _ in labels])
    take = lambda a: np.take_along_axis(  # noqa: E731
        a, order.reshape(order.shape + (1,) * (a.ndim - 2)), axis=1)
    return take(images), take(labels), take(masks)


def test_masked_examples_change_nothing(net, sgd, x64):
    """A padded batch with mask == training on the real rows only (torch, frozen BN)."""
    state_dict, images, labels = net
    p_images, p_labels, masks = padded(images, labels, np.random.RandomState(1))
    state, losses, metrics = run_jax(new_state(state_dict, sgd[0]), p_images, p_labels, masks,
                                     bn_mode="frozen")
    model = torch_model(state_dict)
    torch_losses = torch_frozen_bn_loop(model, torch_sgd(model.parameters()), images[:, :-5],
                                        labels[:, :-5])
    np.testing.assert_allclose(losses, torch_losses, rtol=1e-10)
    assert_trees_close(state.params, to_flax(model.state_dict())["params"])
    assert [m["count"] for m in metrics] == [BATCH - 5] * 3


def test_eval_step_sums_match_torch_and_ignore_padding(net, x64):
    state_dict, images, labels = net
    state = new_state(state_dict, optax.sgd(0.1))
    p_images, p_labels, masks = padded(images, labels, np.random.RandomState(2))
    got = eval_fn(state, {"image": p_images[0], "label": p_labels[0], "mask": masks[0]})

    model = torch_model(state_dict).eval()
    with torch.no_grad():
        logits = model(nchw(images[0, :-5]))
    y = torch.from_numpy(labels[0, :-5])
    top5 = logits.topk(5, dim=1).indices
    assert float(got["loss_sum"]) == pytest.approx(
        torch.nn.functional.cross_entropy(logits, y, reduction="sum").item(), rel=1e-12)
    assert float(got["top1"]) == (logits.argmax(1) == y).sum().item()
    assert float(got["top5"]) == (top5 == y[:, None]).any(1).sum().item()
    assert float(got["count"]) == BATCH - 5
    assert 0 < float(got["top5"]) and float(got["top1"]) < BATCH - 5  # not trivially 0 or all


# ------------------------------------------------------------------------- recipes, guards


def test_linear_probe_trains_the_head_only_and_keeps_the_backbone_bit_identical(net, x64):
    """The backbone, its running statistics and the optimizer state for it do not change;
    the head follows torch with a frozen backbone (eval mode, head-only optimizer)."""
    state_dict, images, labels = net
    cfg = OptimConfig(lr=0.05, momentum=0.9, weight_decay=1e-2, recipe="linear-probe",
                      head_lr_mult=10.0)
    tx, schedule = create_optimizer(cfg, total_steps=10, steps_per_epoch=10, batch_size=BATCH)
    state0 = new_state(state_dict, tx)
    state, losses, metrics = run_jax(state0, images, labels, bn_mode="frozen",
                                     learning_rate_fn=schedule)
    for name in state.params:
        if name != "fc":
            assert_trees_equal(state.params[name], state0.params[name])
    assert_trees_equal(state.batch_stats, state0.batch_stats)
    assert all(m["lr"] == np.float32(0.05) for m in metrics)

    model = torch_model(state_dict)
    for p in model.parameters():
        p.requires_grad_(False)
    model.fc.requires_grad_(True)
    torch_frozen_bn_loop(model, torch_sgd(model.fc.parameters(), lr=0.5), images, labels)
    assert_trees_close(state.params["fc"], to_flax(model.state_dict())["params"]["fc"])


def test_non_finite_loss_is_reported_and_the_update_skipped(net, sgd, x64):
    state_dict, images, labels = net
    state = new_state(state_dict, sgd[0])
    bad = images[0].copy()
    bad[3, 0, 0, 0] = np.inf
    after, metrics = step_fn(state, {"image": bad, "label": labels[0]}, bn_mode="frozen")
    assert not bool(metrics["finite"])
    assert not np.isfinite(float(metrics["loss"]))
    assert_trees_equal((after.step, after.params, after.opt_state, after.batch_stats),
                       (state.step, state.params, state.opt_state, state.batch_stats))
    _, metrics = step_fn(state, {"image": images[0], "label": labels[0]}, bn_mode="frozen")
    assert bool(metrics["finite"])


def test_bfloat16_compute_keeps_float32_params_and_optimizer_state(net):
    """Mixed precision: the model computes in bfloat16; params, moments and loss are float32."""
    state_dict, images, labels = net
    state_dict = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    tx, _ = create_optimizer(SGD, total_steps=10, steps_per_epoch=10, batch_size=BATCH)
    state = new_state(state_dict, tx, dtype=jnp.bfloat16)
    batch = {"image": jnp.asarray(images[0], jnp.float32), "label": jnp.asarray(labels[0])}
    state, metrics = step_fn(state, batch)
    floats = [leaf for leaf in jax.tree.leaves((state.params, state.batch_stats, state.opt_state))
              if jnp.issubdtype(leaf.dtype, jnp.floating)]
    assert len(floats) > len(jax.tree.leaves(state.params))  # the momentum is in there
    assert all(leaf.dtype == jnp.float32 for leaf in floats)
    assert metrics["loss"].dtype == jnp.float32
    model = torch_model(state_dict, torch.float32).train()
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(model(nchw(images[0]).float()),
                                                 torch.from_numpy(labels[0])).item()
    assert float(metrics["loss"]) == pytest.approx(want, rel=3e-2)


def test_step_options_are_checked_with_clear_messages(net, sgd):
    state_dict, images, labels = net
    state = new_state(state_dict, sgd[0], dtype=jnp.float32)
    batch = {"image": images[0].astype(np.float32), "label": labels[0]}
    with pytest.raises(ValueError, match="bn_mode must be one of train, frozen"):
        train_step(state, batch, bn_mode="eval")
    with pytest.raises(ValueError, match="not divisible by accum_steps=3"):
        train_step(state, batch, accum_steps=3)
    with pytest.raises(KeyError, match="missing \\['label'\\]"):
        train_step(state, {"image": batch["image"]})


# ------------------------------------------------------------------------- README example


def test_readme_example_train_step_in_your_own_loop():
    """The README's "Use the step in your own JAX loop" code, verbatim below the marker."""
    # --- README example ---
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import jaxsft

    model = jaxsft.create_model("resnet18", num_classes=10)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    # or: variables = jaxsft.load_weights("resnet18.pth", arch="resnet18", num_classes=10,
    #                                     rng=jax.random.key(0))
    state = jaxsft.TrainState.create(
        apply_fn=model.apply, params=variables["params"],
        batch_stats=variables["batch_stats"], tx=optax.adamw(1e-3, weight_decay=1e-4))
    ema = state.params  # your own extra: an exponential moving average of the weights

    @jax.jit
    def update(state, ema, batch):
        state, metrics = jaxsft.train_step(state, batch, label_smoothing=0.1)
        ema = optax.incremental_update(state.params, ema, step_size=0.01)
        return state, ema, metrics

    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(8, 32, 32, 3)).astype(np.float32),
             "label": rng.integers(0, 10, size=8)}
    losses = []
    for _ in range(3):
        state, ema, metrics = update(state, ema, batch)
        losses.append(float(metrics["loss"]))
    eval_metrics = jaxsft.eval_step(state.replace(params=ema), batch)
    print(losses, eval_metrics["top1"] / eval_metrics["count"])
    # --- end of README example ---
    assert int(state.step) == 3 and losses[-1] < losses[0]
    assert float(eval_metrics["count"]) == 8
    assert not np.array_equal(jax.tree.leaves(ema)[0], jax.tree.leaves(state.params)[0])
    assert np.isfinite(losses).all()
