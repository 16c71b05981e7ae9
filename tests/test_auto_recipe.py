"""`--recipe auto` and `--recipe seed` (jaxsft.recipes): what they choose, what they leave to
the user, and that the command line fine-tunes with auto when --weights is given."""

import json
import subprocess
import sys

import helpers
import pytest
import torch
import torchvision

from jaxsft import recipes
from jaxsft.config import Config, ConfigError
from jaxsft.data import DatasetInfo


def info(train_examples: int) -> DatasetInfo:
    return DatasetInfo(name="toy", num_classes=10, class_names=tuple("abcdefghij"),
                       train_examples=train_examples, eval_examples=50, eval_split="test",
                       image_key="image", label_key="label")


def auto(**fields) -> Config:
    return Config().replace(recipe="auto", weights="w.pth", batch_size=8, **fields)


@pytest.mark.parametrize("examples, steps, augment", [
    (10, 80, "shift"), (24, 80, "shift"), (32, 80, "none"), (100, 80, "none"),
    (320, 80, "none"), (1297, 324, "none")])
def test_auto_trains_at_least_80_steps_and_2_epochs(examples, steps, augment):
    cfg, line = recipes.resolve(auto(), info(examples))
    assert cfg.run.steps == steps
    assert cfg.data.augment == augment  # shifted views from 25 epochs on (24 images: 3 batches)
    assert cfg.optim.warmup_epochs == round(0.1 * steps) / (examples // 8)  # 10% of the run
    assert (cfg.optim.recipe, cfg.optim.schedule, cfg.model.head_init) == (
        "full", "cosine", "imprint")
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.head_lr_mult) == (0.01, 0.9, 1.0)
    assert (cfg.run.mixup, cfg.run.bn) == (0.0, "train")
    assert line.startswith("recipe auto: ") and f"steps {steps}" in line


def test_auto_keeps_what_the_user_set():
    cfg, _ = recipes.resolve(auto(lr=0.05, epochs=3.0, head_init="zeros", augment="light"),
                             info(100))
    assert (cfg.optim.lr, cfg.run.epochs, cfg.run.steps, cfg.model.head_init) == (
        0.05, 3.0, None, "zeros")
    assert cfg.optim.warmup_epochs == round(0.1 * 36) / 12  # 10% of the user's 3 epochs
    assert cfg.data.augment == "light"
    # The user's length decides auto's augmentation: 25 epochs of 100 images are shifted.
    assert recipes.resolve(auto(epochs=25.0), info(100))[0].data.augment == "shift"
    # On the command line a flag given at its default value is the user's too.
    cfg, _ = recipes.resolve(auto(), info(10), given={"lr", "schedule", "augment"})
    assert (cfg.optim.lr, cfg.optim.schedule, cfg.model.head_init, cfg.data.augment) == (
        0.01, "constant", "imprint", "imagenet")


def test_seed_is_the_seed_documents_loop_and_other_recipes_are_untouched():
    cfg, line = recipes.resolve(Config().replace(recipe="seed", weights="w.pth"), info(100))
    assert cfg == Config().replace(weights="w.pth")  # the defaults are the seed's loop
    assert line == "recipe seed: every setting as given"
    given = Config().replace(recipe="lp-ft", weights="w.pth", lr=0.3)
    assert recipes.resolve(given, info(100)) == (given, "")


def test_auto_needs_weights_and_imprint_needs_weights():
    with pytest.raises(ConfigError, match="--recipe auto needs --weights"):
        Config().replace(recipe="auto")
    with pytest.raises(ConfigError, match="--head-init imprint needs --weights"):
        Config().replace(head_init="imprint")


def test_the_command_line_fine_tunes_with_auto_when_weights_are_given(tmp_path):
    root = helpers.image_folder(tmp_path / "data", {"train": 8, "test": 4}, "ab",
                                helpers.noise)
    torch.manual_seed(0)
    weights = tmp_path / "w.pth"
    torch.save(torchvision.models.resnet18(num_classes=2).state_dict(), weights)
    common = ["--dataset", f"folder:{root}", "--image-size", "16", "--batch-size", "8",
              "--weights", str(weights), "--new-head", "--log-every", "1"]
    out = subprocess.run([sys.executable, "-m", "jaxsft.train", *common, "--steps", "1",
                          "--workdir", str(tmp_path / "run")], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "recipe auto: " in out.stdout
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["optim"]["recipe"], saved["run"]["steps"]) == ("full", 1)
    assert (saved["model"]["head_init"], saved["optim"]["schedule"]) == ("imprint", "cosine")
