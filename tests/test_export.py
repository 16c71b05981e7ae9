"""A workdir's weights out (`python -m jaxsft.export`) into torchvision, and in as --weights."""

import json
import subprocess
import sys

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torchvision
from safetensors.torch import load_file

from jaxsft import checkpoint, export, select
from jaxsft.models import create_model
from jaxsft.state import TrainState
from jaxsft.weights import WeightsError, from_torch_state_dict, load_weights, read_metadata

CLASSES = 3


def trained_looking_variables(seed: int) -> dict:
    """resnet18 variables with non-trivial BatchNorm statistics (torchvision's, randomised)."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=CLASSES)
    helpers.randomize_batchnorm(model)
    return from_torch_state_dict(model.state_dict(), "resnet18")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A workdir whose checkpoints hold a state with a moving average (EMA != weights) at
    steps 1 (best by top-1) and 2."""
    root = tmp_path_factory.mktemp("run")
    model = create_model("resnet18", CLASSES)
    weights, average = trained_looking_variables(0), trained_looking_variables(1)
    state = TrainState.create(apply_fn=model.apply, params=weights["params"],
                              batch_stats=weights["batch_stats"], tx=optax.sgd(0.1), ema=True)
    state = state.replace(ema_params=average["params"], ema_batch_stats=average["batch_stats"])
    meta = {"config": {"model": {"model": "resnet18"}}, "class_names": ["a", "b", "c"]}
    with checkpoint.create_manager(root / "checkpoints", asynchronous=False) as manager:
        for step, top1 in ((1, 0.9), (2, 0.5)):
            checkpoint.save(manager, state.replace(step=jnp.asarray(step, jnp.int32)), meta,
                            metrics={"top1": top1})
    # The run's log evaluated step 2 only (step 1's top-1 is in its checkpoint alone).
    (root / "metrics.jsonl").write_text(json.dumps({"step": 2, "split": "eval", "top1": 0.5}))
    return root, average


def test_export_writes_the_moving_average_torchvision_loads_with_equal_logits(workdir,
                                                                             tmp_path):
    root, average = workdir
    out = subprocess.run([sys.executable, "-m", "jaxsft.export", "--workdir", str(root),
                          "--out", str(tmp_path / "m.safetensors")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "wrote step 1 of" in out.stdout and "resnet18(num_classes=3)" in out.stdout
    torch_model = torchvision.models.resnet18(num_classes=CLASSES)
    torch_model.load_state_dict(load_file(tmp_path / "m.safetensors"))  # strict
    torch_model.eval()
    images = np.random.default_rng(0).normal(size=(4, 64, 64, 3)).astype(np.float32)
    with torch.no_grad():
        want = torch_model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    got = create_model("resnet18", CLASSES).apply(average, images, train=False)
    assert np.abs(np.asarray(got) - want).max() <= 1e-5 * np.abs(want).max()


def test_export_names_a_step_and_refuses_a_workdir_without_checkpoints(workdir, tmp_path):
    root, _ = workdir
    assert export.export(root, tmp_path / "last.safetensors", "latest")["step"] == 2
    with pytest.raises(export.ConfigError, match="no checkpoints in .*train there first"):
        export.export(tmp_path, tmp_path / "x.safetensors")


def test_the_exported_file_names_its_source_and_select_ranks_by_its_top1(workdir, tmp_path):
    root, _ = workdir
    evaluated, unevaluated = tmp_path / "last.safetensors", tmp_path / "best.safetensors"
    export.export(root, evaluated, "latest")
    export.export(root, unevaluated, "best")  # step 1: no eval row, so no figure, not step 2's
    meta = read_metadata(evaluated)
    assert (meta["jaxsft.arch"], meta["jaxsft.step"], meta["jaxsft.source_top1"]) == \
        ("resnet18", "2", "0.5")
    assert "jaxsft.source_top1" not in read_metadata(unevaluated)
    assert select.source_accuracy(select.Candidate("resnet18", str(evaluated))) == 0.5
    assert select.source_accuracy(select.Candidate("resnet18", str(unevaluated))) is None
    load_file(evaluated)  # the header's text does not get in torch's way


def test_a_workdir_is_a_weights_source_with_its_best_checkpoint(workdir):
    root, average = workdir
    loaded = load_weights(root, "resnet18")
    for x, y in zip(jax.tree.leaves(loaded), jax.tree.leaves(average)):
        np.testing.assert_array_equal(x, y)
    new = load_weights(root, "resnet18", num_classes=5, rng=0)
    assert new["params"]["fc"]["kernel"].shape == (512, 5)
    with pytest.raises(WeightsError, match="holds resnet18 weights, not resnet34"):
        load_weights(root, "resnet34")


def test_new_head_replaces_a_head_of_the_same_class_count(workdir):
    root, average = workdir
    kept = load_weights(root, "resnet18", num_classes=CLASSES, rng=0)
    np.testing.assert_array_equal(kept["params"]["fc"]["kernel"],
                                  average["params"]["fc"]["kernel"])
    zeros = load_weights(root, "resnet18", num_classes=CLASSES, new_head=True, head_init="zeros")
    assert not np.any(zeros["params"]["fc"]["kernel"]) and not np.any(zeros["params"]["fc"]["bias"])
    np.testing.assert_array_equal(zeros["params"]["conv1"]["kernel"],
                                  average["params"]["conv1"]["kernel"])
    with pytest.raises(WeightsError, match="pass num_classes"):
        load_weights(root, "resnet18", new_head=True)
