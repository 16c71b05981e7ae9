"""`python -m jaxsft.sweep`: the grid, the held-out validation split, ranking, the records,
resuming, the workdir guard and --retrain, on a generated image folder.

Most tests replace `jaxsft.trainer.fit` with `FakeFit`, which writes what a run writes (its
evaluations in metrics.jsonl) with a validation top-1 that is a known function of the
settings, so the ranking is known; `test_a_real_sweep_...` runs the real trainer.
"""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from jaxsft import cli, sweep, trainer
from jaxsft.config import Config
from jaxsft.trainer import TrainingError

PROG = "python -m jaxsft.sweep"
CLASSES = ("red", "green", "blue")
FIT, VAL = "train[0:36]", "train[36:48]"  # 25% of the 48 training images held out


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """root/{train,test}/<class>/*.png: 16 train and 4 test images per class, 16x16, the
    class's colour channel bright."""
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("test", 4)):
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                image = rng.integers(0, 80, (16, 16, 3)).astype(np.uint8)
                image[..., c] += 150
                Image.fromarray(image).save(root / split / name / f"{i}.png")
    return root


class FakeFit:
    """Stands in for trainer.fit: val top-1 = 0.5 + 10 lr - 1000 weight decay, loss 1 - top-1;
    lr >= 1 diverges; `interrupt_at` (a call number) raises KeyboardInterrupt there."""

    def __init__(self, interrupt_at: int | None = None):
        self.calls: list[Config] = []
        self.interrupt_at = interrupt_at

    def __call__(self, cfg: Config):
        self.calls.append(cfg)
        if len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        if cfg.optim.lr >= 1:
            raise TrainingError(f"the loss became non-finite (lr {cfg.optim.lr:.3g}) by step 1; "
                                "the last checkpoint is kept. Lower --lr")
        top1 = round(0.5 + 10 * cfg.optim.lr - 1000 * cfg.optim.weight_decay, 6)
        workdir = Path(cfg.run.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        rows = [{"step": 1, "split": "eval", "top1": 0.0, "top5": 0.0, "loss": 9.0, "count": 12},
                {"step": 2, "split": "train", "loss": 0.5},
                {"step": 2, "split": "eval", "top1": top1, "top5": 1.0, "loss": 1 - top1,
                 "count": 12}]
        (workdir / trainer.METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return SimpleNamespace(step=2)


@pytest.fixture
def fake_fit(monkeypatch) -> FakeFit:
    fake = FakeFit()
    monkeypatch.setattr(trainer, "fit", fake)
    return fake


def _run(argv: list, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as stop:
        cli.run(sweep.main, [str(a) for a in argv], prog=PROG)
    out, err = capsys.readouterr()
    return stop.value.code, out, err


def _argv(folder: Path, workdir: Path, *grid_and_flags) -> list:
    return ["--dataset", f"folder:{folder}", "--image-size", 16, "--augment", "none",
            "--batch-size", 8, "--steps", 2, "--log-every", 1, "--holdout", 0.25,
            "--workdir", workdir, *grid_and_flags]


def _record(workdir: Path) -> dict:
    return json.loads((workdir / sweep.SWEEP_FILE).read_text())


# ---------------------------------------------------------------------------- the grid


def test_grid_values_are_parsed_with_each_fields_type():
    base = Config().replace(weights="w.pth")
    grid = sweep.parse_grid(["lr=0.003,1e-2", "--weight-decay=0,1e-4", "nesterov=true,no",
                             "steps=10,20", "ema-decay=none,0.99", "milestones=30 60,10",
                             "bn_momentum=auto,0.1", "recipe=full,lp-ft"], base)
    assert grid == {"lr": (0.003, 0.01), "weight_decay": (0.0, 0.0001),
                    "nesterov": (True, False), "steps": (10, 20), "ema_decay": (None, 0.99),
                    "milestones": ((30.0, 60.0), (10.0,)), "bn_momentum": ("auto", "0.1"),
                    "recipe": ("full", "lp-ft")}
    assert isinstance(grid["steps"][0], int) and isinstance(grid["weight_decay"][0], float)
    settings = sweep.trials(grid)
    assert len(settings) == 2 ** 8
    assert settings[0] == {k: v[0] for k, v in grid.items()}
    assert settings[1]["recipe"] == "lp-ft" and settings[-1]["lr"] == 0.01  # first is slowest
    assert sweep.trial_name({"lr": 0.01, "weight_decay": 0.0001, "ema_decay": None}) == (
        "lr=0.01,weight_decay=0.0001,ema_decay=none")
    odd = [sweep.trial_name({"weights": w}) for w in ("a/b.pth", "a_b.pth", "a b.pth")]
    assert len(set(odd)) == 3 and all("/" not in n and " " not in n for n in odd)
    assert odd[1] == "weights=a_b.pth" and odd[0].startswith("weights=a_b.pth-")


@pytest.mark.parametrize("grid,message", [
    (["lr"], "'lr' is not FIELD=V1,V2,...: write e.g. --grid lr=0.003,0.01,0.03"),
    (["lrr=0.1"], "--grid lrr: no such setting (did you mean lr"),
    (["lr=fast"], "--grid lr=fast: lr takes a finite number"),
    (["lr=nan"], "lr takes a finite number"),
    (["steps=1.5"], "--grid steps=1.5: steps takes an integer or none"),
    (["nesterov=maybe"], "nesterov takes true or false"),
    (["lr=0.1,0.10"], "--grid lr lists one value twice (0.1, 0.10)"),
    (["lr=-1"], "--grid lr=-1: --lr must be positive"),
    (["workdir=a,b"], "all trials share --workdir"),
    (["eval-split=test"], "all trials share --eval-split"),
    (["lr=0.1", "lr=0.2"], "--grid lr is given twice"),
    (["recipe=full,linear-probe"], "--grid recipe=linear-probe: --recipe linear-probe needs "
                                   "--weights"),
    (["nesterov=true", "momentum=0,0.9"], "--grid trial nesterov=true,momentum=0.0: --nesterov "
                                          "needs a positive --momentum"),
    (["model=resnet18,resnet19"], "--grid model=resnet19: unknown architecture"),
], ids=lambda x: x[0] if isinstance(x, list) else None)
def test_a_bad_grid_is_one_line_and_exit_2(folder, tmp_path, capsys, fake_fit, grid, message):
    argv = _argv(folder, tmp_path / "s")
    for spec in grid:
        argv += ["--grid", spec]
    code, _, err = _run(argv, capsys)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert err.startswith(f"{PROG}: error: ")
    assert not fake_fit.calls and not (tmp_path / "s").exists()


def test_a_grid_that_cannot_run_fails_before_the_first_trial(folder, tmp_path, capsys,
                                                               fake_fit):
    """The data decide it (batch larger than the 36 training images): found before any trial."""
    argv = _argv(folder, tmp_path / "s", "--grid", "batch_size=8,64")
    code, _, err = _run(argv, capsys)
    assert code == 2 and "trial batch_size=64: " in err and "fewer than --batch-size 64" in err
    assert not fake_fit.calls


# ---------------------------------------------------------------------------- the sweep


def test_trials_are_ranked_by_validation_top1_and_recorded(folder, tmp_path, capsys, fake_fit):
    workdir = tmp_path / "s"
    argv = _argv(folder, workdir, "--grid", "lr=0.003,0.03,10", "--grid", "weight_decay=0,1e-4")
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    assert [(c.optim.lr, c.optim.weight_decay) for c in fake_fit.calls] == [
        (0.003, 0.0), (0.003, 0.0001), (0.03, 0.0), (0.03, 0.0001), (10.0, 0.0), (10.0, 0.0001)]
    for cfg in fake_fit.calls:  # the held-out split of train; the test split is never read
        assert (cfg.data.train_split, cfg.data.eval_split) == (FIT, VAL)
        assert Path(cfg.run.workdir).parent == workdir / "trials"
    assert Path(fake_fit.calls[0].run.workdir).name == "lr=0.003,weight_decay=0.0"

    record = _record(workdir)
    ranked = [(r["rank"], r["name"], r["status"]) for r in record["trials"]]
    assert ranked == [(1, "lr=0.03,weight_decay=0.0", "ok"),
                      (2, "lr=0.03,weight_decay=0.0001", "ok"),
                      (3, "lr=0.003,weight_decay=0.0", "ok"),
                      (4, "lr=0.003,weight_decay=0.0001", "ok"),
                      (None, "lr=10.0,weight_decay=0.0", "failed"),
                      (None, "lr=10.0,weight_decay=0.0001", "failed")]
    best = record["trials"][0]
    assert best["val_top1"] == pytest.approx(0.8) and best["val_loss"] == pytest.approx(0.2)
    assert (best["val_top5"], best["val_examples"], best["steps"]) == (1.0, 12, 2)
    assert best["settings"] == {"lr": 0.03, "weight_decay": 0.0} and best["wall_s"] >= 0
    assert best["workdir"] == "trials/lr=0.03,weight_decay=0.0"
    failed = record["trials"][-1]
    assert failed["error"] == "the loss became non-finite (lr 10) by step 1"
    assert record["best"] == best["name"] and record["retrain"] is None
    assert (record["fit_split"], record["val_split"], record["holdout"]) == (FIT, VAL, 0.25)
    assert (record["fit_examples"], record["val_examples"]) == (36, 12)
    assert record["grid"] == {"lr": [0.003, 0.03, 10.0], "weight_decay": [0.0, 0.0001]}

    table = (workdir / sweep.TABLE_FILE).read_text()
    assert "ranked by the final top-1 on `train[36:48]` (12 examples held out of `train`" in table
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[0] == "| rank | lr | weight_decay | val top-1 | val loss | steps | time | status |"
    assert rows[1] == "| ---: | --- | --- | ---: | ---: | ---: | ---: | --- |"
    assert rows[2].startswith("| 1 | 0.03 | 0.0 | 80.00% | 0.2000 | 2 | ")
    assert rows[2].endswith(" | ok |") and len(rows) == 8
    assert rows[6].startswith("| - | 10.0 | 0.0 |  |  |  | ")
    assert rows[6].endswith("failed: the loss became non-finite (lr 10) by step 1 |")
    assert table.strip() in out  # the ranked table, printed at the end


def test_every_trial_frees_its_compiled_programs(folder, tmp_path, capsys, fake_fit,
                                                monkeypatch):
    """JAX keeps each fit's programs (~660 memory maps for a ResNet-18 run); without freeing
    them a sweep of ~90 trials stops on the kernel's map limit. One clear per trial."""
    import jax

    cleared = []
    monkeypatch.setattr(jax, "clear_caches", lambda: cleared.append(len(fake_fit.calls)))
    code, _, err = _run(_argv(folder, tmp_path / "s", "--grid", "lr=0.003,0.03,10"), capsys)
    assert code == 0, err
    assert cleared == [1, 2, 3]  # after each trial, the failed one too


def test_a_rerun_skips_recorded_trials_and_resumes_an_interrupted_one(folder, tmp_path,
                                                                       capsys, monkeypatch):
    workdir = tmp_path / "s"
    argv = _argv(folder, workdir, "--grid", "lr=0.001,0.002,0.003")
    first = FakeFit(interrupt_at=2)
    monkeypatch.setattr(trainer, "fit", first)
    code, _, err = _run(argv, capsys)
    assert code == 130 and err.startswith(f"{PROG}: stopped"), err
    assert [r["status"] for r in _record(workdir)["trials"]] == ["ok", "pending", "pending"]

    second = FakeFit()
    monkeypatch.setattr(trainer, "fit", second)
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    # the interrupted trial runs again in its workdir (fit resumes it there), then the last
    assert [c.run.workdir for c in second.calls] == [c.run.workdir for c in first.calls[1:]] + [
        str(workdir / "trials" / "lr=0.003")]
    assert "trial 1/3 lr=0.001: recorded (val top-1 51.00%" in out
    done = _record(workdir)

    third = FakeFit()
    monkeypatch.setattr(trainer, "fit", third)
    code, out, err = _run(argv, capsys)
    assert code == 0 and not third.calls, err
    assert _record(workdir) == done
    assert [r["rank"] for r in done["trials"]] == [1, 2, 3]


def test_another_sweep_in_the_same_workdir_is_refused(folder, tmp_path, capsys, fake_fit):
    workdir = tmp_path / "s"
    code, _, err = _run(_argv(folder, workdir, "--grid", "lr=0.001,0.002"), capsys)
    assert code == 0, err
    before = (workdir / sweep.SWEEP_FILE).read_bytes()
    for flags, change in [
        (["--grid", "lr=0.001,0.002,0.003"], "grid lr=0.001,0.002 -> lr=0.001,0.002,0.003"),
        (["--grid", "lr=0.001,0.002", "--batch-size", 4], "batch_size 8 -> 4"),
        (["--grid", "lr=0.001,0.002", "--holdout", 0.5], "holdout 0.25 -> 0.5"),
    ]:
        code, _, err = _run([*_argv(folder, workdir), *flags], capsys)
        assert code == 2 and err.count("\n") == 1, err
        assert f"{workdir} holds another sweep ({change}); pass a new --workdir" in err
    assert (workdir / sweep.SWEEP_FILE).read_bytes() == before and len(fake_fit.calls) == 2

    # a base value the grid overrides, and how often to log, change no trial: accepted
    code, _, err = _run(_argv(folder, workdir, "--grid", "lr=0.001,0.002", "--lr", 0.5,
                              "--log-every", 5), capsys)
    assert code == 0 and len(fake_fit.calls) == 2, err

    grown = shutil.copytree(folder, tmp_path / "grown")  # the data set changes under it
    code, _, err = _run(_argv(grown, tmp_path / "g", "--grid", "lr=0.001"), capsys)
    assert code == 0, err
    for i in range(4):
        shutil.copy(grown / "train" / "red" / "0.png", grown / "train" / "red" / f"new{i}.png")
    code, _, err = _run(_argv(grown, tmp_path / "g", "--grid", "lr=0.001"), capsys)
    assert code == 2 and "(held-out split train[36:48] -> train[39:52]: the data set " in err

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    code, _, err = _run(_argv(folder, run, "--grid", "lr=0.001"), capsys)
    assert code == 2 and f"{run} is a training run's workdir, not a sweep's" in err, err
    code, _, err = _run(_argv(folder, workdir, "--grid", "lr=0.001", "--overwrite"), capsys)
    assert code == 2 and "--overwrite does not apply to a sweep" in err, err


def test_retrain_trains_the_best_settings_on_the_whole_train_split(folder, tmp_path, capsys,
                                                                   fake_fit):
    workdir = tmp_path / "s"
    argv = _argv(folder, workdir, "--grid", "lr=0.003,0.03", "--retrain")
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    final = fake_fit.calls[-1]
    assert len(fake_fit.calls) == 3 and final.optim.lr == 0.03
    assert (final.data.train_split, final.data.eval_split) == ("train", None)  # -> test
    assert final.run.workdir == str(workdir / "best")
    retrain = _record(workdir)["retrain"]
    assert retrain["name"] == "lr=0.03" and retrain["status"] == "ok"
    assert (retrain["eval_split"], retrain["eval_examples"]) == ("test", 12)
    assert retrain["eval_top1"] == pytest.approx(0.8) and retrain["workdir"] == "best"
    line = "Retrained lr=0.03 on `train` in best/: top-1 80.00% on `test` (12 examples"
    assert line in (workdir / sweep.TABLE_FILE).read_text() and line in out

    code, out, err = _run(argv, capsys)
    assert code == 0 and len(fake_fit.calls) == 3 and "retrain of lr=0.03: recorded" in out


def test_when_every_trial_diverges_the_sweep_exits_1(folder, tmp_path, capsys, fake_fit):
    code, _, err = _run(_argv(folder, tmp_path / "s", "--grid", "lr=10,20", "--retrain"), capsys)
    assert code == 1 and "no trial finished" in err, err
    assert [r["status"] for r in _record(tmp_path / "s")["trials"]] == ["failed", "failed"]
    assert len(fake_fit.calls) == 2


# ---------------------------------------------------------------------------- end to end


def test_a_real_trial_trains_on_the_held_out_split_and_is_scored_on_it(folder, tmp_path,
                                                                        capsys):
    """The real trainer, once: what the fake stands in for (ranking, divergence, resuming,
    --retrain) is the trainer's own, tested in test_train_e2e; each trial is another compile."""
    workdir = tmp_path / "s"
    argv = [*_argv(folder, workdir, "--grid", "lr=0.02"), "--no-async-checkpoints"]
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    (trial,) = _record(workdir)["trials"]
    assert (trial["name"], trial["rank"], trial["status"], trial["steps"]) == (
        "lr=0.02", 1, "ok", 2)
    run = workdir / trial["workdir"]
    saved = json.loads((run / "config.json").read_text())
    assert (saved["data"]["train_split"], saved["data"]["eval_split"]) == (FIT, VAL)
    assert saved["optim"]["lr"] == 0.02
    last = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["split"] == "eval"][-1]
    assert (last["step"], last["count"]) == (2, 12)  # the 12 held-out training images
    assert (trial["val_top1"], trial["val_loss"], trial["val_examples"]) == (
        last["top1"], last["loss"], 12)
    assert (run / "checkpoints" / "2").is_dir()
    assert f"| 1 | 0.02 | {100 * last['top1']:.2f}% | " in out


def test_with_weights_trials_use_auto_and_keep_the_grids_and_the_flags_values(
        folder, tmp_path, capsys, fake_fit):
    """As in jaxsft.train, --weights without --recipe is --recipe auto; a grid value or a
    flag equal to the default is still the user's (auto would choose cosine otherwise)."""
    import torch
    import torchvision

    weights = tmp_path / "w.pth"
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), weights)
    argv = _argv(folder, tmp_path / "s", "--weights", weights, "--lr", 0.01,
                 "--grid", "schedule=constant,cosine")
    code, _, err = _run(argv, capsys)
    assert code == 0, err
    seen = [(c.optim.recipe, c.optim.schedule, c.optim.lr, c.model.head_init, c.run.steps)
            for c in fake_fit.calls]
    assert seen == [("full", "constant", 0.01, "imprint", 2), ("full", "cosine", 0.01,
                                                               "imprint", 2)]
