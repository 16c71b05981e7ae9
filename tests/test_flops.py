"""benchmarks.flops: the model's FLOPs, counted per layer, against hand counts written from
the architectures' layer tables (He et al. 2016, Table 1; torchvision's v1.5 stride on the
3x3) and against torch's own counter."""

from __future__ import annotations

import pytest

from benchmarks import flops

# (output height = width, in channels, out channels, kernel, how many such convolutions)
RESNET18_224 = [
    (112, 3, 64, 7, 1),  # stem
    (56, 64, 64, 3, 4),  # layer1: 2 blocks x 2
    (28, 64, 128, 3, 1), (28, 128, 128, 3, 3), (28, 64, 128, 1, 1),  # layer2 (+ downsample)
    (14, 128, 256, 3, 1), (14, 256, 256, 3, 3), (14, 128, 256, 1, 1),  # layer3
    (7, 256, 512, 3, 1), (7, 512, 512, 3, 3), (7, 256, 512, 1, 1),  # layer4
]
RESNET50_224 = [
    (112, 3, 64, 7, 1),
    # layer1 at 56: block 0 (in 64, with downsample), blocks 1-2 (in 256)
    (56, 64, 64, 1, 1), (56, 64, 64, 3, 3), (56, 64, 256, 1, 3), (56, 64, 256, 1, 1),
    (56, 256, 64, 1, 2),
    # layer2: block 0's first 1x1 runs at 56 (the stride is on the 3x3), the rest at 28
    (56, 256, 128, 1, 1), (28, 128, 128, 3, 4), (28, 128, 512, 1, 4), (28, 256, 512, 1, 1),
    (28, 512, 128, 1, 3),
    # layer3: 6 blocks
    (28, 512, 256, 1, 1), (14, 256, 256, 3, 6), (14, 256, 1024, 1, 6), (14, 512, 1024, 1, 1),
    (14, 1024, 256, 1, 5),
    # layer4: 3 blocks
    (14, 1024, 512, 1, 1), (7, 512, 512, 3, 3), (7, 512, 2048, 1, 3), (7, 1024, 2048, 1, 1),
    (7, 2048, 512, 1, 2),
]


def hand_macs(table, fc_in: int, classes: int = 1000) -> int:
    return sum(h * h * cout * cin * k * k * n for h, cin, cout, k, n in table) + fc_in * classes


@pytest.mark.parametrize("arch, table, fc_in, published_gmacs", [
    ("resnet18", RESNET18_224, 512, 1.81),  # torchvision's model card: 1.81 "GFLOPS" (MACs)
    ("resnet50", RESNET50_224, 2048, 4.09),
])
def test_model_count_matches_the_hand_count_of_the_layer_table(arch, table, fc_in,
                                                               published_gmacs):
    hand = 2 * hand_macs(table, fc_in)
    assert hand / 2e9 == pytest.approx(published_gmacs, rel=0.02)  # the table is right
    c = flops.count(arch, 224)
    assert c["forward"] == pytest.approx(hand, rel=0.02)
    assert c["forward"] == hand  # in fact exactly: the same layers, the same shapes
    assert c["train_step"] == 3 * c["forward"]
    assert c["train_step_exact"] == 3 * c["forward"] - 2 * 112 * 112 * 64 * 3 * 49
    assert c["conv_layers"] == sum(n for *_, n in table) and c["dense_layers"] == 1
    assert c["source"] == "model-count"
    assert 0 < c["elementwise_forward"] < 0.02 * c["forward"]


def test_resnet50_training_step_is_the_quoted_24_6_gflop():
    assert flops.count("resnet50", 224)["train_step"] / 1e9 == pytest.approx(24.6, rel=0.01)


def test_forward_count_equals_torchs_flop_counter():
    """torch's FlopCounterMode counts convolutions and the classifier the same way (dense,
    2 per multiply-add): an independent count at another input size and class count."""
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    from torch.utils.flop_counter import FlopCounterMode

    model = torchvision.models.resnet18(num_classes=10).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, 96, 96))
    assert flops.count("resnet18", 96, num_classes=10)["forward"] == counter.get_total_flops()


def test_layer_table_names_and_shapes():
    from jaxsft import create_model

    table = flops.layer_table(create_model("resnet18", num_classes=10), 64)
    assert (table[0].name, table[0].kind, table[0].in_shape, table[0].out_shape) == (
        "conv1", "conv", (64, 64, 3), (32, 32, 64))
    assert table[-1].name == "fc" and table[-1].flops == 2 * 512 * 10
    assert [x.name for x in table if x.kind == "conv"][-1] == "layer4_1/conv2"
    # A 4-channel (padded) stem counts its extra input channel.
    four = flops.layer_table(create_model("resnet18", num_classes=10), 64, channels=4)
    assert four[0].flops == table[0].flops * 4 // 3


def test_mfu_uses_the_model_count_and_says_so():
    assert flops.mfu_flops(24.6e9, 0.44e9) == (24.6e9, "model-count")
    assert flops.mfu_flops(None, 0.44e9) == (0.44e9, "xla-cost-analysis")
    assert flops.mfu_flops(None, None) == (None, "none")


def test_unoptimised_xla_estimate_is_close_to_the_model_count():
    """XLA's cost analysis before optimisation still sees the convolutions (padding taps
    excluded, so a little lower at small sizes): a cross-check of the training step count."""
    import functools

    import jax
    import jax.numpy as jnp
    import optax

    from jaxsft import TrainState, create_model, train_step

    model = create_model("resnet18", num_classes=10)
    x = jnp.zeros((2, 64, 64, 3))
    variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
    state = jax.eval_shape(lambda v: TrainState.create(
        apply_fn=model.apply, params=v["params"], batch_stats=v["batch_stats"],
        tx=optax.sgd(0.01, momentum=0.9)), variables)
    batch = {"image": x, "label": jnp.zeros((2,), jnp.int32)}
    lowered = jax.jit(train_step).lower(state, batch)
    xla = flops.lowered_flops(lowered)
    model_count = 2 * flops.count(model, 64)["train_step"]
    assert xla is not None and 0.6 * model_count < xla < 1.1 * model_count
