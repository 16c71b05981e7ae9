"""The workdir belongs to one run: one process at a time (a lock), one config (refuse another),
and nothing a user has is ever overwritten.

Order at the start of a run (jaxsft.trainer.fit): `create` the directory, take the `lock`
(before anything else is written or deleted there: Orbax removes unfinished saves when a
checkpoint manager starts), `prepare` (compare the config with the run already there), check
that checkpoints can be written, and only once the start has succeeded `save_config`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

from jaxsft import config as config_lib
from jaxsft.config import Config, ConfigError

# Fields that change how a run is watched or saved, not what it computes.
OPERATIONAL_FIELDS = frozenset({
    "workdir", "eval_every", "checkpoint_every", "keep", "log_every", "overwrite", "resume",
    "eval_batch_size", "async_checkpoints", "extend",
})
# The run's length: a longer run continues a shorter one exactly where the learning-rate
# schedule does not depend on the length (warmup and step decays count epochs from the start).
LENGTH_FIELDS = frozenset({"steps", "epochs"})
LENGTH_FREE_SCHEDULES = ("constant", "step", "multistep")
CONFIG_FILE = "config.json"
LOCK_FILE = "jaxsft.lock"
CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"  # a row per log and eval (jaxsft.metrics.read_jsonl)
SUMMARY_FILE = "summary.json"
PLOT_FILE = "curves.png"


class WorkdirInUse(ConfigError):
    """Another run holds the workdir's lock."""


def config_diff(old: Config, new: Config) -> dict[str, tuple[object, object]]:
    """Run-defining fields whose values differ: {name: (old, new)}."""
    a, b = config_lib.to_flat(old), config_lib.to_flat(new)
    return {k: (a[k], b[k]) for k in a if k not in OPERATIONAL_FIELDS and a[k] != b[k]}


# ------------------------------------------------------------------ the directory and its lock

def create(workdir: str | Path) -> Path:
    """Makes the workdir (and its parents); one ConfigError when it cannot be one."""
    path = Path(workdir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--workdir {path} is a file, not a directory; pass a directory "
                          "(it is created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise unwritable(path, e) from None
    return path


def unwritable(path: Path, error: OSError) -> ConfigError:
    """The one line for a place a run cannot write: which, why, and the fix."""
    why = os.strerror(error.errno) if error.errno else str(error)
    return ConfigError(f"cannot write in {path}: {why}; make it writable or pass another "
                       "--workdir")


def check_writable(directory: Path) -> None:
    """Creates and removes a file in `directory`: a read-only place fails here, at once, rather
    than deep inside an asynchronous checkpoint write."""
    probe = directory / f".jaxsft-write-test-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise unwritable(directory, e) from None


class Lock:
    """Held while a run uses its workdir: an exclusive `flock` on `<workdir>/jaxsft.lock`
    (released by the kernel however the process ends), whose content says who holds it."""

    def __init__(self, path: Path, fd: int):
        self.path, self._fd = path, fd

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            if _inode(self.path) == os.fstat(self._fd).st_ino:
                self.path.unlink()  # a clean exit leaves no record behind
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock(workdir: str | Path, *, say: Callable[[str], None] = print) -> Lock:
    """Takes the workdir's lock, or raises WorkdirInUse naming the run that holds it.

    A lock left by a run that crashed (kill -9, power loss) is taken over with a warning when
    its process is known to be gone (same host, pid no longer running, or running another
    program); a record from another host cannot be checked from here, so it is refused with
    the command that removes it. In a multi-host run only process 0 takes it.
    """
    directory = create(workdir)
    path = directory / LOCK_FILE
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise unwritable(directory, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_record(fd)
            os.close(fd)
            raise WorkdirInUse(_in_use(directory, owner)) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise unwritable(directory, e) from None
            # no flock on this file system: the record alone decides
        if _inode(path) == os.fstat(fd).st_ino:
            break
        os.close(fd)  # the holder removed the file between our open and our flock: again
    try:
        _claim(fd, directory, path, say)
    except BaseException:
        os.close(fd)
        raise
    return Lock(path, fd)


def _claim(fd: int, directory: Path, path: Path, say: Callable[[str], None]) -> None:
    """Checks the record a previous holder left, then writes ours."""
    owner, me = _read_record(fd), _record()
    if owner:
        if owner.get("host") != me["host"]:
            raise WorkdirInUse(
                f"{_in_use(directory, owner)}; if no run uses it on that host (it crashed "
                f"there), remove the lock with `rm {path}` and rerun")
        if owner.get("pid") != me["pid"] and _running(owner):
            raise WorkdirInUse(_in_use(directory, owner))
        say(f"warning: took over the lock of {directory} left by pid {owner.get('pid')} on "
            f"host {owner.get('host')}, which is no longer running (a run that crashed or was "
            "killed)")
    data = json.dumps(me).encode()
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
    except OSError as e:
        raise unwritable(directory, e) from None


def _in_use(directory: Path, owner: dict | None) -> str:
    if not owner:
        return f"{directory} is in use by another run"
    since = f" since {owner['since']}" if owner.get("since") else ""
    return f"{directory} is in use by pid {owner.get('pid')} on host {owner.get('host')}{since}"


def _record() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "start_ticks": _start_ticks(os.getpid()),
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def _read_record(fd: int) -> dict | None:
    try:
        raw = os.pread(fd, 4096, 0)
        record = json.loads(raw) if raw.strip() else None
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _running(owner: dict) -> bool:
    """Whether the recorded process still runs on this host (and is the same process: a pid
    reused by another program has another start time)."""
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    ticks = owner.get("start_ticks")
    return ticks is None or _start_ticks(pid) in (None, ticks)


def _start_ticks(pid: int) -> int | None:
    """A process's start time in clock ticks since boot (Linux), None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


# ------------------------------------------------------------------------- the run's config

def has_checkpoints(workdir: str | Path) -> bool:
    """Whether the workdir holds a finished checkpoint step (Orbax's unfinished saves carry a
    suffix and are not steps)."""
    directory = Path(workdir) / CHECKPOINT_DIR
    try:
        return any(p.name.isdigit() for p in directory.iterdir())
    except OSError:
        return False


def prepare(cfg: Config, *, write: bool = True, clock=time.time,
            checkpoint_config: Callable[[], Config | None] | None = None,
            save: bool = True) -> Path:
    """Checks that the workdir belongs to `cfg` (creating it if needed); with `save`, writes
    the resolved config (the trainer saves it only once the start has succeeded).

    The run's config is `config.json`, or where that is missing the config kept in the
    latest intact checkpoint (`checkpoint_config`), from which `config.json` is restored. A
    workdir of another config is refused; with `--overwrite` its contents are moved aside to
    `<workdir>.replaced-<time>` (nothing is deleted) and the run starts afresh. A workdir
    without any checkpoint holds nothing to resume: a start that failed there (a typo in
    --weights) is followed by the corrected command. A new length (`--steps`, `--epochs`)
    continues the run where its schedule allows (see `_check_continuation`).
    """
    workdir = Path(cfg.run.workdir)
    say = print if write else (lambda _: None)
    old = _recorded_config(workdir, checkpoint_config, write)
    diff = config_diff(old, cfg) if old is not None else {}
    if diff and not has_checkpoints(workdir):
        say(f"{workdir} holds no checkpoint (a start that failed?): nothing to resume, so the "
            "new config replaces the old one there")
        diff = {}
    if diff and not cfg.run.overwrite:
        _check_continuation(workdir, diff, cfg, say=say)
        diff = {}
    if diff and write:
        aside = workdir.with_name(f"{workdir.name}.replaced-{int(clock())}")
        _move_contents(workdir, aside)
        print(f"moved the old run in {workdir} to {aside}")
    if write:
        create(workdir)
        if save:
            save_config(cfg, workdir)
    return workdir


def _recorded_config(workdir: Path, checkpoint_config, write: bool) -> Config | None:
    saved = workdir / CONFIG_FILE
    if saved.exists():
        try:
            return config_lib.load(saved)
        except (ConfigError, ValueError) as e:
            raise ConfigError(f"{saved} is not a jaxsft config ({e}); use a new --workdir") \
                from None
    if checkpoint_config is None or not has_checkpoints(workdir):
        return None
    old = checkpoint_config()
    if old is not None and write:
        save_config(old, workdir)
        print(f"{saved} was missing: restored it from the latest checkpoint's config")
    return old


def save_config(cfg: Config, workdir: str | Path) -> None:
    """Writes `<workdir>/config.json` atomically: a crash leaves the old config or the new."""
    saved = Path(workdir) / CONFIG_FILE
    tmp = saved.with_suffix(".json.tmp")
    try:
        config_lib.save(cfg, tmp)
        tmp.replace(saved)
    except OSError as e:
        raise unwritable(Path(workdir), e) from None


def _move_contents(workdir: Path, aside: Path) -> None:
    """Everything in `workdir` but its lock moves to `aside` (renames: nothing is copied or
    deleted); the lock stays, held, where it is."""
    aside.mkdir()
    for entry in sorted(workdir.iterdir()):
        if entry.name != LOCK_FILE:
            entry.rename(aside / entry.name)


def _check_continuation(workdir: Path, diff: dict[str, tuple[object, object]], cfg: Config,
                        say) -> None:
    """Accepts a new length for the same run where it keeps the schedule of the steps done
    (or with --extend, saying what changes); refuses any other difference."""
    changes = ", ".join(f"{k} {v[0]!r} -> {v[1]!r}" for k, v in sorted(diff.items()))
    if set(diff) - LENGTH_FIELDS:
        raise ConfigError(
            f"workdir {workdir} belongs to a different config ({changes}); pass a new "
            "--workdir, or --overwrite to move the old run aside and start afresh")
    schedule = cfg.optim.schedule
    if schedule in LENGTH_FREE_SCHEDULES:
        say(f"continuing the run in {workdir} with a new length ({changes}); the {schedule} "
            "schedule is the same for the steps already done")
    elif cfg.run.extend:
        say(f"extending the run in {workdir} ({changes}): from the step it resumes at, the "
            f"learning rate follows the {schedule} schedule of the new length")
    else:
        raise ConfigError(
            f"workdir {workdir} holds a shorter or longer run ({changes}) whose {schedule} "
            "schedule depends on its length: the remaining steps would use other learning "
            "rates; pass --extend to accept that, or a new --workdir")
