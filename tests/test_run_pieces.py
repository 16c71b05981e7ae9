"""Workdir guard, preemption flag, metric reduction, writers, the progress bar, exit codes."""

import errno
import io
import json
import os
import signal

import numpy as np
import pytest

from jaxsft import cli, metrics, workdir
from jaxsft.config import Config, ConfigError
from jaxsft.preemption import StopRequest


def test_workdir_saves_config_and_accepts_operational_changes(tmp_path):
    cfg = Config().replace(workdir=str(tmp_path / "w"), lr=0.1)
    workdir.prepare(cfg)
    assert json.loads((tmp_path / "w" / "config.json").read_text())["optim"]["lr"] == 0.1
    workdir.prepare(cfg.replace(keep=9, log_every=1, eval_every=5))  # not run-defining


def test_workdir_of_another_config_is_refused_and_never_overwritten(tmp_path):
    wd = tmp_path / "w"
    cfg = Config().replace(workdir=str(wd), lr=0.1)
    workdir.prepare(cfg)
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
