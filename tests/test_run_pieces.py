"""Workdir guard, preemption flag, metric reduction, writers, the progress bar, exit codes."""

import errno
import io
import json
import os
import signal
import types

import numpy as np
import pytest

from jaxsft import cli, metrics, trainer, workdir
from jaxsft.config import Config, ConfigError
from jaxsft.periodic import is_time
from jaxsft.preemption import StopRequest


def test_workdir_saves_config_and_accepts_operational_changes(tmp_path):
    cfg = Config().replace(workdir=str(tmp_path / "w"), lr=0.1)
    workdir.prepare(cfg)
    assert json.loads((tmp_path / "w" / "config.json").read_text())["optim"]["lr"] == 0.1
    workdir.prepare(cfg.replace(keep=9, log_every=1, eval_every=5))  # not run-defining


def a_run_in(wd):
    """What a run that saved its first checkpoint leaves: a finished step directory."""
    (wd / "checkpoints" / "3").mkdir(parents=True)


def test_workdir_of_another_config_is_refused_and_never_overwritten(tmp_path):
    wd = tmp_path / "w"
    cfg = Config().replace(workdir=str(wd), lr=0.1)
    workdir.prepare(cfg)
    a_run_in(wd)
    (wd / "precious").write_text("checkpoint")
    with pytest.raises(ConfigError, match=r"different config \(lr 0.1 -> 0.2\).*--overwrite"):
        workdir.prepare(cfg.replace(lr=0.2))
    assert (wd / "precious").read_text() == "checkpoint"
    workdir.prepare(cfg.replace(lr=0.2, overwrite=True), clock=lambda: 1234)
    assert (tmp_path / "w.replaced-1234" / "precious").read_text() == "checkpoint"
    assert not (wd / "precious").exists()


def test_stop_request_turns_sigterm_into_a_flag_and_restores_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == before


def test_reductions_weight_by_examples():
    train = metrics.reduce_train([
        {"loss": 1.0, "top1": 2, "top5": 4, "count": 4, "grad_norm": 1.0, "lr": 0.1},
        {"loss": 4.0, "top1": 0, "top5": 2, "count": 2, "grad_norm": 3.0, "lr": 0.05},
    ])
    assert train == {"loss": 2.0, "top1": 2 / 6, "top5": 1.0, "grad_norm": 2.0, "lr": 0.05}
    ev = metrics.reduce_eval([{"loss_sum": 3.0, "top1": 1, "top5": 2, "count": 2},
                              {"loss_sum": 1.0, "top1": 1, "top5": 1, "count": 1}])
    assert ev == {"loss": 4 / 3, "top1": 2 / 3, "top5": 1.0, "count": 3}


def test_progress_bar_with_injected_clock():
    now = [100.0]
    out = io.StringIO()
    bar = metrics.ProgressBar(10, "epoch 1", stream=out, enabled=True, clock=lambda: now[0])
    now[0] = 102.0
    line = bar.update(4, loss=0.5, top1=0.25, images_per_s=64)
    assert line == "epoch 1 [#########...............] 4/10  loss 0.5000  top1 25.0%  " \
                   "64 img/s  ETA 00:03"
    assert out.getvalue().startswith("\r")
    quiet = io.StringIO()
    metrics.ProgressBar(10, "e", stream=quiet).update(1)  # StringIO is not a terminal
    assert quiet.getvalue() == ""


def test_writers_and_plot(tmp_path):
    w = metrics.MultiWriter([metrics.JsonlWriter(tmp_path / "m.jsonl"),
                             metrics.TensorBoardWriter(tmp_path / "tb")])
    for step in (1, 2, 3):
        w.write(step, {"loss": 1.0 / step, "top1": 0.1 * step}, "train")
    w.write(3, {"loss": 0.5, "top1": 0.4, "top5": 0.9}, "eval")
    w.close()
    rows = metrics.read_jsonl(tmp_path / "m.jsonl")
    assert [r["split"] for r in rows] == ["train"] * 3 + ["eval"]
    assert np.isclose(rows[1]["loss"], 0.5)
    assert any(f.name.startswith("events.out.tfevents") for f in (tmp_path / "tb").iterdir())
    png = metrics.plot_curves(tmp_path / "m.jsonl", tmp_path / "c.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_full_disk_is_one_line_and_status_2_while_other_os_errors_keep_their_traceback(capsys):
    def full(argv):
        raise OSError(errno.ENOSPC, "No space left on device", "runs/x/metrics.jsonl")

    with pytest.raises(SystemExit) as stopped:
        cli.run(full, [], prog="python -m jaxsft.train")
    assert stopped.value.code == 2
    assert capsys.readouterr().err == ("python -m jaxsft.train: error: [Errno 28] No space left "
                                       "on device: 'runs/x/metrics.jsonl'\n")

    def bug(argv):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/tmp/missing")

    with pytest.raises(FileNotFoundError):
        cli.run(bug, [], prog="python -m jaxsft.train")


@pytest.mark.parametrize("schedule, extend, accepted", [
    ("constant", False, True), ("multistep", False, True), ("step", False, True),
    ("cosine", False, False), ("linear", False, False), ("cosine", True, True),
])
def test_a_finished_run_continues_for_longer_where_its_schedule_allows(tmp_path, capsys,
                                                                      schedule, extend,
                                                                      accepted):
    extra = {"milestones": (1.0,)} if schedule == "multistep" else {}
    cfg = Config().replace(workdir=str(tmp_path / "w"), schedule=schedule, steps=3, **extra)
    workdir.prepare(cfg)
    a_run_in(tmp_path / "w")
    longer = cfg.replace(steps=6, extend=extend)
    if not accepted:
        with pytest.raises(ConfigError, match=rf"\(steps 3 -> 6\) whose {schedule} schedule "
                                              r"depends on its length.*pass --extend"):
            workdir.prepare(longer)
        assert json.loads((tmp_path / "w" / "config.json").read_text())["run"]["steps"] == 3
        return
    workdir.prepare(longer)
    assert "steps 3 -> 6" in capsys.readouterr().out
    assert json.loads((tmp_path / "w" / "config.json").read_text())["run"]["steps"] == 6
    with pytest.raises(ConfigError, match=r"different config \(lr 0.01 -> 0.1, steps 6 -> 9\)"):
        workdir.prepare(longer.replace(steps=9, lr=0.1))  # a length change hides nothing


def test_is_time_runs_on_its_cadence_and_after_the_last_step():
    assert [s for s in range(1, 11) if is_time(s, 4, 10)] == [4, 8, 10]
    assert [s for s in range(1, 11) if is_time(s, None, 10)] == [10]
    assert [s for s in range(1, 4) if is_time(s, 1, 3)] == [1, 2, 3]


def test_epoch_progress_opens_a_bar_per_epoch_and_closes_it_at_the_epoch_end():
    out = io.StringIO()
    progress = metrics.EpochProgress(steps_per_epoch=4, total_steps=10, enabled=True,
                                     stream=out)
    for step in range(3, 11):  # resumed at step 3: the first bar covers the rest of epoch 1
        progress.begin(step)
        progress.update(step, loss=1.0)
        progress.end(step)
    lines = out.getvalue().split("\n")
    finals = [line.rsplit("\r", 1)[-1] for line in lines if line]
    assert [f.split("]")[1].split()[0] for f in finals] == ["4/4", "4/4", "2/2"]
    assert [f.split(" [")[0] for f in finals] == ["epoch 1", "epoch 2", "epoch 3"]
    assert out.getvalue().count("\n") == 3


def _plan(**fields):
    info = types.SimpleNamespace(eval_split=fields.pop("eval_split", "test"))
    base = dict(info=info, num_classes=3, steps_per_epoch=5, total_steps=12, eval_every=4,
                checkpoint_every=6, log_every=3, bn_mode="train", probe_steps=0,
                bn_momentum=0.1, tx=None, schedule=None)
    return trainer.Plan(**{**base, **fields})


def test_the_loop_logs_evaluates_and_saves_on_its_cadences():
    plan = _plan()
    due = {s: trainer._due(plan, s, stopping=False) for s in range(1, 13)}
    assert [s for s, d in due.items() if d.eval] == [4, 8, 12]
    assert [s for s, d in due.items() if d.save] == [4, 6, 8, 12]
    assert [s for s, d in due.items() if d.log] == [3, 4, 5, 6, 8, 9, 10, 12]
    assert trainer._due(plan, 7, stopping=True) == trainer.Due(log=True, eval=False, save=True)
    no_eval = _plan(eval_split=None)
    assert not any(trainer._due(no_eval, s, False).eval for s in range(1, 13))


def test_top5_is_shown_only_where_it_says_something():
    row = {"top1": 0.5, "top5": 1.0}
    assert trainer._accuracy(row, num_classes=5) == "top-1 50.00%"
    assert trainer._accuracy(row, num_classes=6) == "top-1 50.00% top-5 100.00%"


def test_a_float64_run_needs_x64_mode_turned_on_by_its_caller():
    import jax

    with jax.enable_x64(False), pytest.raises(ConfigError, match="jax_enable_x64"):
        trainer.make_plan(Config().replace(dtype="float64"))
