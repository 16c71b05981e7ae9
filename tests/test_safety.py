"""Nothing a user has is lost: the workdir lock, checkpoint integrity through the CLIs, failed
starts, a lost config.json, unwritable places, data sets that cannot train a classifier."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import SHAPES, shapes_folder
from PIL import Image
from test_train_e2e import cli, flags, small_config

from jaxsft import checkpoint, metrics, predict, workdir
from jaxsft.config import Config, ConfigError
from jaxsft.data import folder as folder_lib
from jaxsft.trainer import CHECKPOINT_DIR

TRAIN = "python -m jaxsft.train: error: "


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """The shapes of test_train_e2e: 12 train and 5 test images per class."""
    return shapes_folder(tmp_path_factory.mktemp("shapes"))


def last_line(out: subprocess.CompletedProcess) -> str:
    return out.stderr.strip().splitlines()[-1]


# ------------------------------------------------------------------------------- the lock

def test_a_second_holder_is_refused_with_the_pid_and_host_of_the_first(tmp_path):
    with workdir.lock(tmp_path / "w") as held:
        record = json.loads(held.path.read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        with pytest.raises(workdir.WorkdirInUse, match=rf"{tmp_path / 'w'} is in use by pid "
                                                       rf"{os.getpid()} on host "):
            workdir.lock(tmp_path / "w")
    assert not (tmp_path / "w" / workdir.LOCK_FILE).exists()  # a clean exit leaves none
    workdir.lock(tmp_path / "w").release()


HOLD = ("import sys, time; from jaxsft import workdir; workdir.lock(sys.argv[1]); "
        "print('held', flush=True); time.sleep(600)")


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_warning(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "w")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(workdir.WorkdirInUse, match=rf"in use by pid {holder.pid} "):
            workdir.lock(tmp_path / "w")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    said = []
    with workdir.lock(tmp_path / "w", say=said.append):
        assert json.loads((tmp_path / "w" / workdir.LOCK_FILE).read_text())["pid"] == os.getpid()
    assert len(said) == 1 and f"left by pid {holder.pid}" in said[0]
    assert "no longer running" in said[0]


def test_a_lock_whose_pid_now_runs_another_program_is_taken_over(tmp_path):
    (tmp_path / workdir.LOCK_FILE).write_text(json.dumps(
        {"pid": os.getppid(), "host": socket.gethostname(), "start_ticks": 1}))
    said = []
    workdir.lock(tmp_path, say=said.append).release()
    assert said and "no longer running" in said[0]


def test_a_lock_from_another_host_is_refused_with_how_to_remove_it(tmp_path):
    lock_file = tmp_path / workdir.LOCK_FILE
    lock_file.write_text(json.dumps({"pid": 42, "host": "elsewhere", "since": "noon"}))
    with pytest.raises(workdir.WorkdirInUse,
                       match=rf"in use by pid 42 on host elsewhere since noon; if no run uses "
                             rf"it on that host \(it crashed there\), remove the lock with "
                             rf"`rm {lock_file}`"):
        workdir.lock(tmp_path)
    assert json.loads(lock_file.read_text())["host"] == "elsewhere"  # left as it was


# --------------------------------------------------------------------- unwritable places

@pytest.fixture
def immutable():
    """`chattr +i`: a directory nobody can write in, root included (chmod does not stop
    root); undone at the end so pytest can clean up."""
    made = []

    def make(path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
            pytest.skip("chattr +i is not available here")
        made.append(path)
        return path

    yield make
    for path in made:
        subprocess.run(["chattr", "-i", str(path)])


def test_unwritable_places_are_one_line(tmp_path, immutable):
    ro = immutable(tmp_path / "ro")
    with pytest.raises(ConfigError, match=rf"cannot write in {ro}: Operation not permitted; "
                                          "make it writable or pass another --workdir"):
        workdir.lock(ro)
    with pytest.raises(ConfigError, match="cannot write in"):
        workdir.lock(ro / "below")
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"--workdir .*/file is a file, not a directory"):
        workdir.lock(tmp_path / "file")
    ckpts = immutable(tmp_path / "w" / "checkpoints")
    with pytest.raises(ConfigError, match=rf"cannot write in {ckpts}: Operation not permitted"):
        workdir.check_writable(ckpts)


# --------------------------------------------------------------- the workdir's config

def test_a_workdir_without_checkpoints_accepts_a_corrected_config(tmp_path, capsys):
    cfg = Config().replace(workdir=str(tmp_path / "w"), weights="/tmp/typo.pth")
    workdir.prepare(cfg)  # what a start that failed at --weights used to leave
    fixed = cfg.replace(weights=None)
    workdir.prepare(fixed)
    assert "nothing to resume" in capsys.readouterr().out
    assert json.loads((tmp_path / "w" / "config.json").read_text())["model"]["weights"] is None


def test_without_config_json_the_checkpoints_config_is_checked_and_restored(tmp_path):
    cfg = Config().replace(workdir=str(tmp_path / "w"), lr=0.1)
    (tmp_path / "w" / "checkpoints" / "5").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"different config \(lr 0.1 -> 0.2\)"):
        workdir.prepare(cfg.replace(lr=0.2), save=False, checkpoint_config=lambda: cfg)
    assert json.loads((tmp_path / "w" / "config.json").read_text())["optim"]["lr"] == 0.1
    workdir.prepare(cfg.replace(keep=7), save=False, checkpoint_config=lambda: 1 / 0)


# ------------------------------------------------------------------ metrics, data, predict

def test_a_resumed_run_drops_the_rows_it_replays(tmp_path):
    path = tmp_path / "metrics.jsonl"
    w = metrics.JsonlWriter(path)
    for step in (1, 2, 3, 4):
        w.write(step, {"loss": 1.0}, "train")
    w.close()
    with open(path, "a") as f:
        f.write('{"step": 5, "spl')  # torn by a crash
    w = metrics.JsonlWriter(path, after=2)
    w.write(3, {"loss": 0.5}, "train")
    w.close()
    rows = metrics.read_jsonl(path)
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 1.0), (3, 0.5)]


def write_images(directory: Path, n: int = 2) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((8, 8, 3), 20 * i % 256, np.uint8)).save(directory / f"{i}.png")


def test_links_that_lead_out_of_their_split_are_skipped(tmp_path, caplog):
    root = tmp_path / "data"
    for split in ("train", "test"):
        for c in ("a", "b"):
            write_images(root / split / c)
    (root / "train" / "parent").symlink_to(root)  # would hold every split's images
    (root / "train" / "peek").symlink_to(root / "test" / "a")  # evaluation images
    (root / "train" / "a" / "x.png").symlink_to(root / "test" / "b" / "0.png")
    elsewhere = tmp_path / "disk2" / "c"  # images kept on another disk: followed
    write_images(elsewhere)
    (root / "train" / "c").symlink_to(elsewhere)
    index = folder_lib.scan(str(root), 0.1)
    assert index.class_names == ("a", "b", "c")
    train = [Path(f) for f, _ in index.splits["train"]]
    assert len(train) == 6 and not any("/data/test/" in str(f.resolve()) for f in train)
    assert caplog.text.count("skipped") == 3 and "another split" in caplog.text
    one_split = tmp_path / "flat"
    for c in ("a", "b"):
        write_images(one_split / c, 3)
    (one_split / "loop").symlink_to(one_split)
    assert folder_lib.scan(str(one_split), 0.3).class_names == ("a", "b")


def test_predict_on_a_directory_says_it_is_one(tmp_path):
    workdir.save_config(Config().replace(workdir=str(tmp_path)), tmp_path)
    with pytest.raises(ConfigError, match=rf"{tmp_path} is a directory, not an image file"):
        predict.predict(str(tmp_path), [str(tmp_path)])


def test_the_wrong_architecture_is_said_in_each_callers_words(capsys):
    from jaxsft import cli
    from jaxsft.weights import _wrong_arch

    error = _wrong_arch("r50.pth", "resnet50", "resnet18")
    assert str(error) == "r50.pth holds resnet50 weights, not resnet18: pass arch='resnet50'"

    def main(argv):
        raise error

    with pytest.raises(SystemExit) as code:
        cli.run(main, [], prog="python -m jaxsft.train")
    assert code.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "python -m jaxsft.train: error: r50.pth holds resnet50 weights, not resnet18: "
        "pass --model resnet50")


# ------------------------------------------------------ through the CLI, failing at once

def one_class(tmp_path) -> Path:
    root = tmp_path / "one"
    for split in ("train", "test"):
        write_images(root / split / "only", 12)
    return root


def test_what_cannot_train_a_classifier_fails_at_once(folder, tmp_path):
    cfg = small_config(folder, tmp_path / "run", steps=1)
    cases = [
        ([*flags(cfg), "--dataset", f"folder:{one_class(tmp_path)}"], "has 1 class: a "
         "classifier needs two or more"),
        ([*flags(cfg), "--num-classes", "1"], "--num-classes 1 is below the 3 classes of"),
        ([*flags(cfg), "--num-classes", "2"], "labels 2..2 would have no output; pass "
         "--num-classes 3"),
    ]
    for args, message in cases:
        out = cli("jaxsft.train", *args, timeout=120)
        assert out.returncode == 2 and message in last_line(out), out.stderr
        assert "Traceback" not in out.stderr
    assert not (tmp_path / "run" / CHECKPOINT_DIR).exists()


def test_unwritable_workdirs_exit_2_within_seconds(folder, tmp_path, immutable):
    cfg = small_config(folder, tmp_path / "run", steps=2)
    ro = immutable(tmp_path / "ro")
    (tmp_path / "file").write_text("")
    ro_ckpts = immutable(tmp_path / "w" / CHECKPOINT_DIR)
    cases = [(ro, f"cannot write in {ro}: Operation not permitted"),
             (tmp_path / "file", f"--workdir {tmp_path / 'file'} is a file"),
             (tmp_path / "w", f"cannot write in {ro_ckpts}: Operation not permitted")]
    for wd, message in cases:
        started = time.monotonic()
        out = cli("jaxsft.train", *flags(cfg), "--workdir", str(wd), timeout=200)
        took = time.monotonic() - started
        assert out.returncode == 2 and message in last_line(out), out.stderr
        assert "Traceback" not in out.stderr
        assert took < 60, f"{took:.0f}s: it must not wait on Orbax's timeouts"


# ---------------------------------------------- through the CLI, around one trained run

@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory):
    """A start that fails at --weights, then the corrected command: trains 4 steps, saving
    steps 2 and 4 (each with an evaluation), in one workdir."""
    wd = tmp_path_factory.mktemp("trained") / "run"
    cfg = small_config(folder, wd, steps=4, eval_every=2)
    typo = cli("jaxsft.train", *flags(cfg), "--eval-every", "2", "--weights", "/tmp/typo.pth")
    fixed = cli("jaxsft.train", *flags(cfg), "--eval-every", "2")
    return cfg, wd, typo, fixed


def test_a_failed_start_is_followed_by_the_corrected_command(trained):
    cfg, wd, typo, fixed = trained
    assert typo.returncode == 2 and "/tmp/typo.pth" in last_line(typo), typo.stderr
    assert fixed.returncode == 0, fixed.stderr
    assert json.loads((wd / "config.json").read_text())["model"]["weights"] is None
    with checkpoint.create_manager(wd / CHECKPOINT_DIR, read_only=True) as m:
        assert checkpoint.intact_steps(m) == [2, 4]
        assert all((wd / CHECKPOINT_DIR / str(s) / checkpoint.MANIFEST_FILE).is_file()
                   for s in (2, 4))


def copy_of(trained, tmp_path) -> tuple[Config, Path]:
    cfg, wd, *_ = trained
    shutil.copytree(wd, tmp_path / "run")
    (tmp_path / "run" / workdir.LOCK_FILE).unlink(missing_ok=True)
    return cfg.replace(workdir=str(tmp_path / "run")), tmp_path / "run"


def largest_file(step_dir: Path) -> Path:
    return max((f for f in step_dir.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)


def test_a_truncated_checkpoint_is_named_and_resuming_falls_back(trained, tmp_path):
    cfg, wd = copy_of(trained, tmp_path)
    data_file = largest_file(wd / CHECKPOINT_DIR / "4" / "state")
    data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])
    out = cli("jaxsft.evaluate", "--workdir", str(wd), "--checkpoint", "4", timeout=200)
    assert out.returncode == 2, out.stderr
    assert f"checkpoint {wd / CHECKPOINT_DIR}/4 is damaged: " in last_line(out)
    assert "truncated" in last_line(out) and "intact: 2" in last_line(out)

    resumed = cli("jaxsft.train", *flags(cfg), "--eval-every", "2")
    assert resumed.returncode == 0, resumed.stderr
    assert f"checkpoint {wd / CHECKPOINT_DIR}/4 is damaged" in resumed.stderr
    assert "at step 2" in resumed.stdout and "does not fit" not in resumed.stderr
    with checkpoint.create_manager(wd / CHECKPOINT_DIR, read_only=True) as m:
        assert checkpoint.intact_steps(m) == [2, 4]  # step 4 trained again, sealed again
    assert (wd / "checkpoints-damaged" / "4").is_dir()  # the damaged one kept aside
    rows = metrics.read_jsonl(wd / "metrics.jsonl")
    steps = [(r["step"], r["split"]) for r in rows]
    assert len(steps) == len(set(steps)), "a replayed step is written once"


def test_garbage_in_a_checkpoint_is_never_loaded(trained, tmp_path):
    _, wd = copy_of(trained, tmp_path)
    data_file = largest_file(wd / CHECKPOINT_DIR / "4" / "state")
    with open(data_file, "r+b") as f:
        f.seek(data_file.stat().st_size // 2)
        f.write(np.random.default_rng(0).bytes(4096)[: data_file.stat().st_size // 2])
    for args in (["--checkpoint", "4"], ["--checkpoint", "latest"]):
        out = cli("jaxsft.evaluate", "--workdir", str(wd), *args, timeout=200)
        assert out.returncode == 2, out.stderr
        assert f"{wd / CHECKPOINT_DIR}/4 is damaged: " in last_line(out)
        assert "sha256 differs" in last_line(out)


def test_a_deleted_config_json_is_checked_against_the_checkpoint_and_restored(trained,
                                                                               tmp_path):
    cfg, wd = copy_of(trained, tmp_path)
    saved = (wd / "config.json").read_text()
    (wd / "config.json").unlink()
    out = cli("jaxsft.train", *flags(cfg.replace(lr=0.5)), "--eval-every", "2", timeout=200)
    assert out.returncode == 2, out.stderr
    assert "belongs to a different config (lr 0.05 -> 0.5)" in last_line(out)
    assert json.loads((wd / "config.json").read_text()) == json.loads(saved)


def test_two_trainings_in_one_workdir_one_refuses_the_other_finishes_intact(folder, tmp_path):
    cfg = small_config(folder, tmp_path / "run", steps=12, checkpoint_every=3)
    first = subprocess.Popen([sys.executable, "-m", "jaxsft.train", *flags(cfg)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock_file = tmp_path / "run" / workdir.LOCK_FILE
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and first.poll() is None:
        if (tmp_path / "run" / "metrics.jsonl").exists():  # it trains, holding the lock
            break
        time.sleep(0.1)
    assert json.loads(lock_file.read_text())["pid"] == first.pid
    second = cli("jaxsft.train", *flags(cfg), timeout=200)
    assert second.returncode == 2, second.stderr
    assert last_line(second) == (f"{TRAIN}{tmp_path / 'run'} is in use by pid {first.pid} on "
                                 f"host {socket.gethostname()} since "
                                 f"{json.loads(lock_file.read_text())['since']}")
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    assert not lock_file.exists()
    with checkpoint.create_manager(tmp_path / "run" / CHECKPOINT_DIR, read_only=True) as m:
        assert checkpoint.intact_steps(m) == sorted(m.all_steps()) and 12 in m.all_steps()
    variables, _ = checkpoint.restore_variables(tmp_path / "run" / CHECKPOINT_DIR, "latest")
    assert variables["params"]


def test_evaluate_defaults_to_the_best_checkpoint_and_predict_answers(trained, folder):
    _, wd, *_ = trained
    evals = [r for r in metrics.read_jsonl(wd / "metrics.jsonl") if r["split"] == "eval"]
    best = max((r["top1"], r["step"]) for r in evals)[1]
    out = cli("jaxsft.evaluate", "--workdir", str(wd), "--json", timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["step"] == best

    image = folder / "test" / "circle" / "0.png"
    out = cli("jaxsft.predict", "--workdir", str(wd), "--top-k", "2", str(image), timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()[-3:]
    assert lines[0] == str(image)
    shown = [line.split() for line in lines[1:]]
    assert [name for _, name in shown][0] in SHAPES and len(shown) == 2
    assert float(shown[0][0].rstrip("%")) >= float(shown[1][0].rstrip("%"))


def test_resume_path_starts_elsewhere_and_sigint_exits_130(trained, tmp_path):
    cfg, wd, *_ = trained
    other = cfg.replace(workdir=str(tmp_path / "other"), steps=12)
    proc = subprocess.Popen([sys.executable, "-m", "jaxsft.train", *flags(other),
                             "--resume", str(wd)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    rows = tmp_path / "other" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if rows.exists() and rows.read_text().strip():
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.05)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert f"started from {wd} at step 4" in out
    stopped_at = int(re.search(r"SIGINT at step (\d+)", err).group(1))
    assert 5 <= stopped_at < 12
    with checkpoint.create_manager(tmp_path / "other" / CHECKPOINT_DIR, read_only=True) as m:
        assert max(m.all_steps()) == stopped_at
