"""The product end to end: train, resume, evaluate, predict, and every way a run can fail."""

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import SHAPES, image_folder, run_module_with_file_size_limit, shapes_folder

import jaxsft
from jaxsft import checkpoint, metrics, predict, trainer
from jaxsft.config import Config, ConfigError
from jaxsft.state import TrainState
from jaxsft.trainer import CHECKPOINT_DIR, evaluate, fit

SIZE = 16


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """root/{train,test}/<shape>/*.png: 12 train and 5 test images per class."""
    return shapes_folder(tmp_path_factory.mktemp("shapes"))


def small_config(folder: Path, workdir: Path, **overrides) -> Config:
    base = dict(model="resnet18", dataset=f"folder:{folder}", image_size=SIZE, augment="light",
                batch_size=8, lr=0.05, steps=8, log_every=1, workdir=str(workdir))
    return Config().replace(**{**base, **overrides})


def cli(module: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=timeout)


def flags(cfg: Config) -> list[str]:
    return ["--model", cfg.model.model, "--dataset", cfg.data.dataset,
            "--image-size", str(cfg.data.image_size), "--augment", cfg.data.augment,
            "--batch-size", str(cfg.data.batch_size), "--lr", str(cfg.optim.lr),
            "--steps", str(cfg.run.steps), "--log-every", str(cfg.run.log_every),
            "--workdir", cfg.run.workdir]


def final_variables(workdir: Path):
    variables, _ = checkpoint.restore_variables(workdir / CHECKPOINT_DIR, "latest")
    return variables


@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory) -> tuple[Config, TrainState]:
    """One fit of 8 steps, evaluating and saving at steps 4 and 8, for the tests that only
    read its workdir (or a copy of it)."""
    cfg = small_config(folder, tmp_path_factory.mktemp("trained") / "run", eval_every=4)
    return cfg, fit(cfg)


def test_fit_evaluate_predict_on_an_image_folder(trained, folder):
    cfg, state = trained
    assert int(state.step) == 8
    wd = Path(cfg.run.workdir)
    for name in ("config.json", "metrics.jsonl", "curves.png", "summary.json"):
        assert (wd / name).is_file(), name
    assert any((wd / "tensorboard").iterdir())
    rows = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, 9))
    evals = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [4, 8] and all(r["count"] == 15 for r in evals)

    result = evaluate(cfg, "latest")
    assert result["count"] == 15 and result["step"] == 8
    assert np.isclose(result["top1"], evals[-1]["top1"])

    out = cli("jaxsft.evaluate", "--workdir", str(wd), "--checkpoint", "latest", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["count"] == 15

    image = str(folder / "test" / "square" / "0.png")
    top = predict.predict(str(wd), [image], "latest", top_k=2)[0]
    assert len(top) == 2 and {name for name, _ in top} <= set(SHAPES)
    assert top[0][1] >= top[1][1] and 0 < top[0][1] <= 1


def test_fit_under_tfds_mock_data(tmp_path):
    import tensorflow_datasets as tfds
    from test_data_tfds import write_metadata

    # Split sizes come from the metadata the mock reads; the examples are random images.
    write_metadata(tfds, "cifar10", tmp_path / "meta", {"train": 20, "test": 20})
    cfg = Config().replace(model="resnet18", dataset="cifar10", image_size=SIZE,
                           augment="light", batch_size=8, steps=3, log_every=1,
                           eval_batch_size=8, workdir=str(tmp_path / "run"),
                           # mock_data's patched file access races with Orbax's background
                           # metadata writes (seen twice under load): save in the foreground
                           async_checkpoints=False)
    with tfds.testing.mock_data(num_examples=20, data_dir=str(tmp_path / "meta"),
                                policy=tfds.testing.MockPolicy.USE_FILES):
        state = fit(cfg)
        result = evaluate(cfg, "latest")
    assert int(state.step) == 3
    assert result["count"] == 20 and result["split"] == "test"


def test_resume_after_sigterm_is_bit_exact(folder, tmp_path):
    whole = small_config(folder, tmp_path / "whole", steps=14, checkpoint_every=1000)
    stopped = small_config(folder, tmp_path / "stopped", steps=14, checkpoint_every=1000)
    assert cli("jaxsft.train", *flags(whole)).returncode == 0

    proc = subprocess.Popen([sys.executable, "-m", "jaxsft.train", *flags(stopped)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics_file = tmp_path / "stopped" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= 3:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM at step" in err and "rerun the same command" in err
    k = json.loads(metrics_file.read_text().splitlines()[-1])["step"]
    assert 3 <= k < 14, "the signal must land mid-run for this test to mean anything"

    resumed = cli("jaxsft.train", *flags(stopped))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and f"at step {k}" in resumed.stdout, (
        resumed.stdout, err, metrics_file.read_text())

    a, b = final_variables(tmp_path / "whole"), final_variables(tmp_path / "stopped")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    rows_a = [json.loads(line) for line in (tmp_path / "whole/metrics.jsonl").read_text()
              .splitlines()]
    rows_b = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    after = lambda rows: [{k2: v for k2, v in r.items() if k2 != "images_per_s"}  # noqa: E731
                          for r in rows if r["step"] > k and r["split"] == "train"]
    assert after(rows_a) == after(rows_b) and len(after(rows_b)) == 14 - k


def test_a_signal_landing_mid_step_is_saved_at_the_step_it_stops(folder, tmp_path,
                                                                  monkeypatch):
    # The stop flag turns true at step 3's look: no evaluation (every 4 steps, an epoch) and no
    # checkpoint (every 1000) is due there, so only the save on a stop request keeps it.
    class LateSignal(trainer.StopRequest):
        reads = 0

        @property
        def requested(self):
            LateSignal.reads += 1
            self.signal_name = "SIGTERM" if LateSignal.reads >= 3 else None
            return self.signal_name is not None

    monkeypatch.setattr(trainer, "StopRequest", LateSignal)
    cfg = small_config(folder, tmp_path / "run", steps=8, checkpoint_every=1000)
    with pytest.raises(trainer.Preempted) as stopped:
        fit(cfg)
    assert stopped.value.step == 3
    with checkpoint.create_manager(tmp_path / "run" / CHECKPOINT_DIR, read_only=True) as m:
        assert m.all_steps() == [3]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(folder, tmp_path):
    cfg = small_config(folder, tmp_path / "run", lr=1e30, steps=20)
    out = cli("jaxsft.train", *flags(cfg), "--checkpoint-every", "1")
    assert out.returncode == 1, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert "non-finite" in last and "Lower --lr" in last and "new --workdir" in last, last
    bad = int(re.search(r"by step (\d+)", last).group(1))
    with checkpoint.create_manager(tmp_path / "run" / CHECKPOINT_DIR, read_only=True) as m:
        assert max(m.all_steps()) == bad - 1  # the step before the loss broke, not after
    variables = final_variables(tmp_path / "run")
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(variables))


def test_a_finished_run_continues_for_longer_bit_exactly(trained, tmp_path):
    whole, _ = trained  # 8 steps in one run; this one stops at 3 (mid-epoch), then goes on
    fit(whole.replace(workdir=str(tmp_path / "run"), steps=3))
    continued = fit(whole.replace(workdir=str(tmp_path / "run")))
    assert int(continued.step) == 8
    for x, y in zip(jax.tree.leaves(final_variables(tmp_path / "run")),
                    jax.tree.leaves(final_variables(Path(whole.run.workdir)))):
        np.testing.assert_array_equal(x, y)


def test_workdir_of_another_config_is_refused(trained, tmp_path):
    cfg, _ = trained
    shutil.copytree(cfg.run.workdir, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"belongs to a different config \(lr 0.05 -> 0.5\)"):
        fit(cfg.replace(workdir=str(tmp_path / "run"), lr=0.5))


@pytest.mark.parametrize("bad_flags, message", [
    (["--weights", "/nonexistent/weights.pth"], "/nonexistent/weights.pth"),
    (["--model", "resnet19"], "unknown --model 'resnet19'; known models: resnet101"),
    (["--dataset", "no_such_dataset_xyz"], "no_such_dataset_xyz"),
    (["--accum-steps", "3"], "per-device batch 2 is not divisible by --accum-steps 3"),
])
def test_user_mistakes_fail_fast_with_exit_status_2(folder, tmp_path, bad_flags, message):
    cfg = small_config(folder, tmp_path / "run", steps=1)
    out = cli("jaxsft.train", *flags(cfg), *bad_flags, timeout=120)
    assert out.returncode == 2, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("python -m jaxsft.train: error: ") and message in last
    assert "Traceback" not in out.stderr


def test_a_full_disk_stops_with_one_line_and_the_rerun_trains_on(folder, tmp_path):
    # A real failed write, through Orbax's background threads.
    cfg = small_config(folder, tmp_path / "run", steps=2)
    out = run_module_with_file_size_limit("jaxsft.train", *flags(cfg))
    assert out.returncode == 2, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last == ("python -m jaxsft.train: error: could not write a checkpoint in "
                    f"{tmp_path / 'run' / CHECKPOINT_DIR}: File too large; free space there or "
                    "use a --workdir with room, then rerun the same command: no checkpoint was "
                    "completed, so it starts again"), out.stderr
    assert "Traceback" not in out.stderr and "Event loop is closed" not in out.stderr
    with checkpoint.create_manager(tmp_path / "run" / CHECKPOINT_DIR, read_only=True) as m:
        assert m.all_steps() == []  # the partial save is not a checkpoint

    again = cli("jaxsft.train", *flags(cfg))
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in (tmp_path / "run" / CHECKPOINT_DIR).iterdir()) == ["2"]


@pytest.fixture(scope="module")
def pretrained(trained, tmp_path_factory) -> Path:
    """A user's pretrained file: the trained run's resnet18 (3 classes) as .safetensors."""
    cfg, _ = trained
    variables, _ = checkpoint.restore_variables(Path(cfg.run.workdir) / CHECKPOINT_DIR, "latest")
    path = tmp_path_factory.mktemp("pretrained") / "pretrained.safetensors"
    jaxsft.save_torch_state_dict(variables, path)
    return path


def test_resume_does_not_need_the_weights_file_any_more(folder, pretrained, tmp_path):
    weights = tmp_path / "pretrained.safetensors"
    shutil.copy(pretrained, weights)
    cfg = small_config(folder, tmp_path / "run", steps=2, weights=str(weights))
    fit(cfg)
    weights.unlink()  # the workdir's checkpoint outranks --weights: nothing reads the file now
    assert int(fit(cfg).step) == 2


COLOURS = ("red", "green", "blue")  # the channel each class brightens


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    """An easy task: which of red, green, blue dominates a noisy image (16 + 8 per class)."""
    def draw(name: str, rng: np.random.Generator) -> np.ndarray:
        img = rng.integers(0, 90, (16, 16, 3)).astype(np.uint8)
        img[..., COLOURS.index(name)] += 120
        return img

    return image_folder(tmp_path_factory.mktemp("colours"), {"train": 16, "test": 8}, COLOURS,
                        draw, seed=1)


def test_a_run_learns_an_easy_task(colours, tmp_path):
    cfg = small_config(colours, tmp_path / "run", steps=30, lr=0.05, log_every=10,
                       eval_every=30)
    fit(cfg)
    # The run's own evaluation of step 30 (what evaluate() of it gives: see the first test).
    result = [r for r in metrics.read_jsonl(tmp_path / "run" / "metrics.jsonl")
              if r["split"] == "eval"][-1]
    assert result["step"] == 30 and result["count"] == 24 and result["top1"] >= 0.75, result


def test_the_trainer_wires_every_step_option(folder, pretrained, tmp_path, monkeypatch):
    seen = {}

    class Wired(Exception):
        pass

    def capture(**options):
        seen.update(options)
        raise Wired

    monkeypatch.setattr(trainer.steps, "pmap_train_step", capture)
    real_initial_state = trainer.initial_state

    def spy(cfg, plan, pretrained=True):
        state = real_initial_state(cfg, plan, pretrained)
        seen["dtype"] = state.apply_fn.__self__.dtype
        return state

    monkeypatch.setattr(trainer, "initial_state", spy)
    cfg = small_config(folder, tmp_path / "a", bn="frozen", accum_steps=2, label_smoothing=0.1,
                       dtype="bfloat16", weights=str(pretrained))
    with pytest.raises(Wired):
        fit(cfg)
    assert seen["bn_mode"] == "frozen" and seen["accum_steps"] == 2
    assert seen["label_smoothing"] == 0.1 and seen["dtype"] == jax.numpy.bfloat16
    with pytest.raises(Wired):
        fit(small_config(folder, tmp_path / "b", recipe="linear-probe", weights=str(pretrained)))
    assert seen["bn_mode"] == "frozen"  # a linear probe keeps the backbone's statistics


def test_the_demo_pretrains_exports_and_fine_tunes_with_auto_seed_and_scratch(tmp_path,
                                                                                  capsys):
    from jaxsft import demo

    # 2 pretraining steps on one rendering per face; 2 fine-tuning steps per arm.
    result = demo.run(tmp_path, pretrain_steps=2, renderings=1, finetune_steps=2,
                      labels_per_class=4)
    out = capsys.readouterr().out
    assert (tmp_path / "pretrained_resnet18.safetensors").is_file()
    for label in demo.ARM_LABELS.values():
        assert f"{label}:" in out
    auto_line = next(line for line in out.splitlines() if line.startswith("recipe auto: "))
    # auto chose the augmentation (2 steps of 40 images: none); the demo did not set it.
    assert "head-init imprint" in auto_line and "augment none" in auto_line
    assert set(result) == {"auto", "seed", "scratch"}
    assert all(0 <= v <= 1 for v in result.values())
    # The fine-tuned runs start from a new 10-class head, not the 62 characters' one: the
    # first loss is near ln 10, never that of a confidently wrong old head.
    rows = [json.loads(line) for line in (tmp_path / "seed" / "metrics.jsonl").open()]
    assert rows[0]["split"] == "train" and rows[0]["loss"] < 5
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["run"]["steps"] == 2
