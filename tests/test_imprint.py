"""Imprinted heads (jaxsft.imprint): the class-mean rule, and the head a run starts from."""

import helpers
import numpy as np
import torch
import torchvision

from jaxsft import checkpoint, select
from jaxsft.config import Config, DataConfig
from jaxsft.imprint import SCALE, class_mean_head
from jaxsft.trainer import CHECKPOINT_DIR, fit
from jaxsft.weights import load_weights


def test_the_head_is_the_cosine_nearest_class_mean_rule_on_centred_features():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 5)
    features = rng.normal(size=(20, 16)) + 3 * rng.normal(size=(4, 16))[labels] + 5.0
    head = class_mean_head(features, labels, 4)
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
