"""The fine-tuning recipes through `fit` and the CLI: LP-FT, L2-SP, EMA, Mixup/CutMix, early
stopping, head treatment, BatchNorm momentum."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import torchvision
from helpers import image_folder, noise

from jaxsft import checkpoint, trainer
from jaxsft.config import Config, ConfigError
from jaxsft.state import TrainState
from jaxsft.trainer import CHECKPOINT_DIR, fit

CLASSES = ("a", "b", "c")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """root/{train,test}/<class>/*.png of noise images: 8 train and 3 test per class."""
    return image_folder(tmp_path_factory.mktemp("noise"), {"train": 8, "test": 3}, CLASSES, noise)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A torchvision resnet18 state dict with a 3-class head, as a user's pretrained file."""
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=len(CLASSES)).state_dict(), path)
    return path


def config(folder: Path, workdir: Path, **overrides) -> Config:
    base = dict(model="resnet18", dataset=f"folder:{folder}", image_size=16, augment="light",
                batch_size=8, lr=0.05, steps=6, log_every=1, workdir=str(workdir))
    return Config().replace(**{**base, **overrides})


def variables(workdir: Path, step="latest"):
    with checkpoint.create_manager(workdir / CHECKPOINT_DIR, read_only=True,
                                   asynchronous=False) as manager:
        step = checkpoint.resolve_step(manager, step)
    return checkpoint.restore_variables(workdir / CHECKPOINT_DIR, step)[0]


def stop_after(monkeypatch, steps: int) -> None:
    """The run is stopped (as by SIGTERM) after `steps` steps: the loop reads the flag once
    per step."""
    class Stop(trainer.StopRequest):
        reads = 0

        @property
        def requested(self):
            Stop.reads += 1
            self.signal_name = "SIGTERM" if Stop.reads >= steps else None
            return self.signal_name is not None

    monkeypatch.setattr(trainer, "StopRequest", Stop)


def assert_same(a, b) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def lp_ft(folder, weights, tmp_path_factory) -> tuple[Config, TrainState]:
    """LP-FT (3 probe steps of 6) with EMA, L2-SP and Mixup/CutMix, uninterrupted; evaluated
    and saved at each epoch's end (3 steps), for the tests that only read it."""
    cfg = config(folder, tmp_path_factory.mktemp("lp_ft") / "whole", weights=str(weights),
                 recipe="lp-ft", probe_steps=3, ema_decay=0.5, l2sp=0.01, l2sp_head=1e-3,
                 mixup=0.2, cutmix=1.0, checkpoint_every=1000)
    return cfg, fit(cfg)


def test_lp_ft_with_ema_l2sp_and_mixing_resumes_bit_exactly_at_the_boundary(
        lp_ft, weights, tmp_path, monkeypatch):
    cfg, whole = lp_ft
    cfg = cfg.replace(workdir=str(tmp_path / "stopped"))
    with monkeypatch.context() as patch:
        stop_after(patch, 3)
        with pytest.raises(trainer.Preempted) as stopped:
            fit(cfg)
    assert stopped.value.step == 3
    probed = variables(tmp_path / "stopped")  # the EMA's at the boundary
    resumed = fit(cfg)
    assert_same(resumed.params, whole.params)
    assert_same(resumed.ema_params, whole.ema_params)
    assert_same(resumed.opt_state, whole.opt_state)
    # The probe kept the backbone: its EMA after 3 steps is the loaded backbone, the head moved.
    loaded = trainer.load_weights(str(weights), "resnet18", num_classes=3)
    assert_same(probed["params"]["layer1_0"], loaded["params"]["layer1_0"])
    assert_same(probed["batch_stats"], loaded["batch_stats"])
    assert not np.array_equal(probed["params"]["fc"]["kernel"], loaded["params"]["fc"]["kernel"])
    assert not np.array_equal(whole.params["layer1_0"]["conv1"]["kernel"],
                              loaded["params"]["layer1_0"]["conv1"]["kernel"])


def test_the_evaluation_and_the_best_checkpoint_are_the_moving_averages(lp_ft):
    cfg, state = lp_ft
    workdir = Path(cfg.run.workdir)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
    last = [r for r in rows if r["split"] == "eval"][-1]
    assert last["step"] == 6
    direct = trainer.evaluate(cfg, "latest")
    assert direct["top1"] == pytest.approx(last["top1"]) and direct["loss"] == pytest.approx(
        last["loss"])
    assert_same(variables(workdir)["params"], state.ema_params)
    assert not np.array_equal(state.ema_params["fc"]["kernel"], state.params["fc"]["kernel"])


def test_early_stop_ends_the_run_and_a_rerun_has_nothing_to_do(folder, weights, tmp_path,
                                                               capsys):
    # Frozen statistics and a learning rate this small change no prediction: every evaluation
    # after the first is no better, so 2 of them end the run at step 3 of 20.
    cfg = config(folder, tmp_path / "run", weights=str(weights), bn="frozen", lr=1e-12,
                 steps=20, eval_every=1, early_stop=2)
    state = fit(cfg)
    assert int(state.step) == 3
    assert "early stop at step 3: no better top-1 in 2 evaluations" in capsys.readouterr().out
    assert int(fit(cfg).step) == 3
    assert "stopped early); nothing to do" in capsys.readouterr().out


def test_new_head_with_zeros_starts_every_class_at_equal_odds(folder, weights, tmp_path):
    cfg = config(folder, tmp_path / "run", weights=str(weights), new_head=True,
                 head_init="zeros", steps=1, lr=1e-12)
    fit(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert rows[0]["loss"] == pytest.approx(np.log(3), rel=1e-6)


def test_bn_momentum_auto_follows_kornblith_and_reaches_the_model():
    assert trainer._bn_momentum("auto", 50) == 0.1
    assert trainer._bn_momentum("auto", 400) == pytest.approx(0.025)
    assert trainer._bn_momentum("0.3", 400) == 0.3


def test_bn_momentum_reaches_the_model_and_sets_how_fast_running_statistics_move(
        folder, weights, tmp_path):
    cfg = config(folder, tmp_path, bn_momentum="auto", weights=str(weights))
    plan = trainer.make_plan(cfg)  # 3 steps per epoch: auto = min(10 / 3, 0.1)
    state = trainer.initial_state(cfg, plan)
    assert plan.bn_momentum == 0.1 and state.apply_fn.__self__.bn_momentum == 0.1
    # Its variables serve any momentum (momentum is no variable): an untrained torchvision
    # network's, whose running means are 0.
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    assert not np.asarray(variables["batch_stats"]["bn1"]["mean"]).any()
    images = np.random.default_rng(0).normal(1.0, 1.0, (4, 16, 16, 3)).astype(np.float32)
    means = []
    for momentum in (0.01, 1.0):
        model = trainer.create_model("resnet18", 3, bn_momentum=momentum)
        _, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
        means.append(np.asarray(updates["batch_stats"]["bn1"]["mean"]))
    # From a running mean of 0, one step leaves momentum x the batch mean.
    np.testing.assert_allclose(means[0], 0.01 * means[1], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("flags, message", [
    (["--recipe", "lp-ft"], "--recipe lp-ft needs --weights"),
    (["--probe-steps", "2"], "add --recipe lp-ft"),
    (["--l2sp", "0.1"], "--l2sp pulls toward pretrained weights: it needs --weights"),
    (["--ema-decay", "1"], "--ema-decay must be in (0, 1)"),
    (["--bn-momentum", "fast"], "--bn-momentum must be auto or a number"),
    (["--mixup", "-1"], "--mixup must be >= 0"),
])
def test_recipe_mistakes_are_one_line_before_jax_starts(flags, message):
    out = subprocess.run([sys.executable, "-m", "jaxsft.train", *flags], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("python -m jaxsft.train: error: ") and message in last, out.stderr


def test_a_probe_as_long_as_the_run_is_refused(folder, weights, tmp_path):
    with pytest.raises(ConfigError, match="leaves no fine-tuning"):
        trainer.make_plan(config(folder, tmp_path, weights=str(weights), recipe="lp-ft",
                                 probe_steps=6))
