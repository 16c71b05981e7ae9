"""Imprinted heads (jaxsft.imprint): the class-mean rule, and the head a run starts from."""

import threading

import helpers
import numpy as np
import pytest
import torch
import torchvision

from jaxsft import checkpoint, imprint, select, trainer
from jaxsft.config import Config, ConfigError, DataConfig
from jaxsft.imprint import SCALE, SCALE_MAX, class_mean_head
from jaxsft.trainer import CHECKPOINT_DIR, fit
from jaxsft.weights import load_weights


def test_the_head_is_the_cosine_nearest_class_mean_rule_on_centred_features():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 5)
    features = rng.normal(size=(20, 16)) + 3 * rng.normal(size=(4, 16))[labels] + 5.0
    head = class_mean_head(features, labels, 4, scale=SCALE)
    # By hand: centre on the mean feature, unit-normalise, average per class, unit-normalise.
    centred = features - features.mean(0)
    unit = centred / np.linalg.norm(centred, axis=1, keepdims=True)
    means = np.stack([unit[labels == k].mean(0) for k in range(4)])
    w = means / np.linalg.norm(means, axis=1, keepdims=True)
    r = np.linalg.norm(centred, axis=1).mean()
    queries = rng.normal(size=(30, 16)) + 5.0
    logits = queries @ head["kernel"] + head["bias"]
    np.testing.assert_allclose(logits, SCALE * (queries - features.mean(0)) @ w.T / r,
                               rtol=1e-12, atol=1e-12)
    cosines = (queries - features.mean(0)) @ w.T  # the nearest class mean by cosine
    np.testing.assert_array_equal(logits.argmax(1), cosines.argmax(1))


def clustered(seed: int, classes: int, per_class: int, spread: float) -> tuple:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), per_class)
    centres = spread * rng.normal(size=(classes, 16))
    return rng.normal(size=(len(labels), 16)) + centres[labels], labels


def loo_cross_entropy(features, labels, classes, scales):
    """By definition: each example scored against the class means with itself left out of its
    own class's (centring and the mean radius as in the head, from all examples)."""
    centred = features - features.mean(0)
    radius = np.linalg.norm(centred, axis=1).mean()
    unit = centred / np.linalg.norm(centred, axis=1, keepdims=True)
    losses = []
    for i, y in enumerate(labels):
        if (labels == y).sum() < 2:
            continue
        means = []
        for k in range(classes):
            members = (labels == k) & (np.arange(len(labels)) != i)
            mean = unit[members].sum(0)
            means.append(mean / np.linalg.norm(mean) if members.any() else mean)
        z = np.outer(scales, centred[i] @ np.stack(means).T / radius)
        losses.append(np.log(np.exp(z).sum(1)) - z[:, y])
    return np.mean(losses, axis=0)


def head_scale(head: dict, features, labels, classes) -> float:
    return float(np.linalg.norm(head["kernel"]) / np.linalg.norm(
        class_mean_head(features, labels, classes, scale=1.0)["kernel"]))


@pytest.mark.parametrize("spread", [0.3, 1.0])
def test_the_default_scale_minimises_the_leave_one_out_cross_entropy(spread):
    features, labels = clustered(3, 4, 5, spread)
    scale = head_scale(class_mean_head(features, labels, 4), features, labels, 4)
    grid = np.geomspace(0.1, 100, 4001)
    losses = loo_cross_entropy(features, labels, 4, grid)
    assert abs(np.log(scale / grid[losses.argmin()])) < 2e-3
    assert loo_cross_entropy(features, labels, 4, [scale])[0] <= losses.min() + 1e-9
    assert 0.1 < scale < 100


def test_weakly_separated_classes_get_a_less_confident_head():
    scales = []
    for spread in (0.2, 2.0):
        features, labels = clustered(4, 3, 6, spread)
        scales.append(head_scale(class_mean_head(features, labels, 3), features, labels, 3))
    assert scales[0] < scales[1]


def test_single_example_classes_keep_the_fixed_scale_and_separable_ones_are_capped():
    features, labels = clustered(5, 4, 1, 1.0)
    np.testing.assert_allclose(class_mean_head(features, labels, 4)["kernel"],
                               class_mean_head(features, labels, 4, scale=SCALE)["kernel"])
    features, labels = clustered(5, 3, 4, 5.0)  # no overlap: the loss falls without end
    scale = head_scale(class_mean_head(features, labels, 3), features, labels, 3)
    assert SCALE_MAX * 0.99 < scale <= SCALE_MAX


def test_two_processes_each_with_half_the_examples_get_the_one_process_head():
    features, labels = clustered(6, 3, 8, 0.5)
    barrier, shared, heads = threading.Barrier(2), [None, None], [None, None]

    def process(i: int) -> None:
        def total(x):  # what process_allgather + sum does across two hosts
            shared[i] = np.asarray(x)
            barrier.wait()
            out = shared[0] + shared[1]
            barrier.wait()
            return out
        mine = slice(i, None, 2)
        heads[i] = class_mean_head(features[mine], labels[mine], 3, total=total)

    threads = [threading.Thread(target=process, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    want = class_mean_head(features, labels, 3)
    for head in heads:
        np.testing.assert_allclose(head["kernel"], want["kernel"], rtol=1e-9)
        np.testing.assert_allclose(head["bias"], want["bias"], rtol=1e-9, atol=1e-12)


def test_imprint_scale_is_for_imprinted_heads():
    with pytest.raises(ConfigError, match="--imprint-scale sets an imprinted head's scale"):
        Config().replace(weights="w.pth", imprint_scale=3.0)
    with pytest.raises(ConfigError, match="--imprint-scale must be positive"):
        Config().replace(weights="w.pth", head_init="imprint", imprint_scale=0.0)
    cfg = Config().replace(weights="w.pth", recipe="auto", imprint_scale=3.0)
    assert cfg.model.imprint_scale == 3.0


def test_a_class_without_examples_gets_a_zero_vector():
    features = np.random.default_rng(1).normal(size=(6, 8))
    head = class_mean_head(features, np.array([0, 0, 0, 2, 2, 2]), 3)
    assert np.all(head["kernel"][:, 1] == 0) and head["bias"][1] == 0
    assert np.all(np.isfinite(head["kernel"]))


def test_scores_do_not_depend_on_the_order_of_examples():
    rng = np.random.default_rng(2)
    features, labels = rng.normal(size=(12, 8)), np.arange(12) % 3
    order = rng.permutation(12)
    a, b = class_mean_head(features, labels, 3), class_mean_head(features[order],
                                                                  labels[order], 3)
    np.testing.assert_allclose(a["kernel"], b["kernel"], rtol=1e-12)


def test_a_head_function_gets_the_loaded_backbone_and_its_result_is_the_head(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=7)
    path = tmp_path / "w.pth"
    torch.save(model.state_dict(), path)
    seen = {}

    def head(variables):
        seen["conv1"] = np.asarray(variables["params"]["conv1"]["kernel"])
        seen["fc"] = np.asarray(variables["params"]["fc"]["kernel"])
        return {"kernel": np.ones((512, 3), np.float32), "bias": np.full(3, 2.0, np.float32)}

    variables = load_weights(path, "resnet18", num_classes=3, head_init=head)
    want = model.conv1.weight.detach().numpy().transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(seen["conv1"], want)
    assert seen["fc"].shape == (512, 3) and not seen["fc"].any()  # zero until replaced
    assert float(variables["params"]["fc"]["bias"][0]) == 2.0


def test_a_run_starts_from_the_class_means_of_the_loaded_features(tmp_path):
    """fit's initial head = class_mean_head of the features jaxsft.select extracts with the
    loaded weights (eval preprocessing, running statistics as loaded)."""
    tints = {c: np.random.default_rng(k).integers(0, 256, 3) for k, c in enumerate("abc")}

    def tinted(c, rng):  # classes differ in colour, examples in noise
        return np.clip(tints[c] + rng.normal(0, 40, (16, 16, 3)), 0, 255).astype(np.uint8)

    root = helpers.image_folder(tmp_path / "data", {"train": 8, "test": 4}, "abc", tinted)
    torch.manual_seed(0)
    path = tmp_path / "w.pth"
    torch.save(torchvision.models.resnet18(num_classes=5).state_dict(), path)
    data = DataConfig(dataset=f"folder:{root}", image_size=16, batch_size=8, augment="none")
    got = select.extract_features(select.Candidate("resnet18", str(path)), data)
    assert len(got.labels) == 24
    want = class_mean_head(got.features, got.labels, 3)
    cfg = Config().replace(model="resnet18", dataset=data.dataset, image_size=16,
                           augment="none", batch_size=8, lr=1e-12, steps=1,
                           weights=str(path), head_init="imprint",
                           workdir=str(tmp_path / "run"))
    fit(cfg)
    with checkpoint.create_manager(tmp_path / "run" / CHECKPOINT_DIR, read_only=True,
                                   asynchronous=False) as manager:
        step = checkpoint.resolve_step(manager, "latest")
    head = checkpoint.restore_variables(tmp_path / "run" / CHECKPOINT_DIR, step)[0]["params"]["fc"]
    np.testing.assert_allclose(np.asarray(head["kernel"]), want["kernel"], rtol=1e-4,
                               atol=1e-6)
    np.testing.assert_allclose(np.asarray(head["bias"]), want["bias"], rtol=1e-4, atol=1e-6)


def test_a_runs_imprint_scale_reaches_the_imprinter(tmp_path, monkeypatch):
    """`--imprint-scale` is handed to the head's computation (its effect on the head is
    class_mean_head's, tested above)."""
    root = helpers.image_folder(tmp_path / "data", {"train": 4}, "ab", helpers.noise)
    seen = {}

    class Seen(Exception):
        pass

    def imprinter(*args, **kwargs):
        seen.update(kwargs)
        raise Seen

    monkeypatch.setattr(imprint, "imprinter", imprinter)
    cfg = Config().replace(dataset=f"folder:{root}", image_size=16, batch_size=4,
                           weights="w.pth", head_init="imprint", imprint_scale=2.5,
                           workdir=str(tmp_path / "run"))
    with pytest.raises(Seen):
        trainer.initial_state(cfg, trainer.make_plan(cfg))
    assert seen["scale"] == 2.5
