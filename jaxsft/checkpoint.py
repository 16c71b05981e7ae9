"""Orbax checkpoints of the whole train state: save asynchronously, keep latest + best, resume.

Layout: `<workdir>/checkpoints/<step>/{state,meta,jaxsft-sha256.json}`. `state` holds
params, batch_stats, opt_state, step and rng as arrays; `meta` (JSON) holds the data position,
epoch and config. Orbax writes each step into a temporary directory and renames it only once
complete, so a save interrupted by a crash or a full disk is never listed as a checkpoint (and
is cleaned up on restart); a failed write becomes a CheckpointError naming the step a rerun
resumes from.

Integrity (Orbax 0.12 has no checksum of its own over the data it writes): once a step's
save has finished, process 0 writes `jaxsft-sha256.json` into the step's directory, the size
and sha256 of every file of the step. Every restore checks them first: a truncated, missing or
altered file makes the step "damaged", named as such (never "does not fit this model"), and
never loaded. Resuming falls back to the newest intact step with a warning; an explicit step
(`--checkpoint N`, `--resume DIR/N`) that is damaged is an error naming it. A step without the
file (written by an older jaxsft, or a crash between Orbax's rename and the seal) is read as
it is, and one that cannot be read is passed over in the same way when resuming.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from flax import serialization

if TYPE_CHECKING:
    import orbax.checkpoint as ocp

BEST_METRIC = "top1"
MANIFEST_FILE = "jaxsft-sha256.json"


class _OrbaxNoise(logging.Filter):
    """Orbax warns on every save without metrics once best_fn is set; the saves between
    evaluations have none by design (BestN ignores them), so the warning is noise. A failed
    write is logged by four of Orbax's threads, each with a traceback (the lines stay, the
    tracebacks go), and again by asyncio for each of its write tasks (dropped): the
    CheckpointError that follows says what failed and what to do."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "did not provide metrics" in record.getMessage():
            return False
        if record.exc_info and os_error_code(record.exc_info[1]) is not None:
            if record.name == "asyncio":
                return False
            record.exc_info = record.exc_text = None
        return True


class _ClosedLoopHook:
    """After a failed write, TensorStore completes Orbax's futures into event loops Orbax has
    already closed: dozens of "Event loop is closed" tracebacks with nothing to act on."""

    def __init__(self, previous) -> None:
        self.previous = previous

    def __call__(self, unraisable) -> None:
        if not (isinstance(unraisable.exc_value, RuntimeError)
                and str(unraisable.exc_value) == "Event loop is closed"):
            self.previous(unraisable)


def quiet_orbax() -> None:
    """Drops Orbax's noise (see _OrbaxNoise, _ClosedLoopHook) from this process's logs.

    Process-wide (logging filters, `sys.unraisablehook`), so the CLIs call it through
    `jaxsft.setup()`; importing this module changes nothing. Calling it again is harmless.
    """
    for name in ("absl", "asyncio"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _OrbaxNoise) for f in logger.filters):
            logger.addFilter(_OrbaxNoise())
    if not isinstance(sys.unraisablehook, _ClosedLoopHook):
        sys.unraisablehook = _ClosedLoopHook(sys.unraisablehook)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used or written; the message says which and why."""


class DamagedCheckpoint(CheckpointError):
    """A checkpoint step whose files are not those written (truncated, altered, missing)."""


def _orbax() -> Any:
    """orbax.checkpoint, imported at first use: its import configures Python's logging
    (`logging.basicConfig`), which importing jaxsft must not do to its host program."""
    import orbax.checkpoint

    return orbax.checkpoint


def create_manager(directory: str | Path, keep: int = 3, *, asynchronous: bool = True,
                   read_only: bool = False) -> ocp.CheckpointManager:
    """Keeps the `keep` latest checkpoints plus the best one by validation top-1.

    The manager also remembers (`unsealed`) the steps this process saved and has not sealed
    yet: their checksums are written once their asynchronous save has finished.
    """
    ocp = _orbax()
    keep_policy = ocp.checkpoint_managers.preservation_policy
    policy = keep_policy.AnyPreservationPolicy([
        keep_policy.LatestN(n=keep),
        keep_policy.BestN(get_metric_fn=lambda m: m[BEST_METRIC], n=1,
                          keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy,
        best_fn=lambda m: m[BEST_METRIC],  # also makes Orbax write the metrics to disk
        best_mode="max",
        enable_async_checkpointing=asynchronous,
        cleanup_tmp_directories=not read_only,
        read_only=read_only,
        create=not read_only,
    )
    manager = ocp.CheckpointManager(Path(directory).absolute(), options=options,
                                    item_names=("state", "meta"))
    manager.unsealed = []
    return manager


def save(manager: ocp.CheckpointManager, state: Any, meta: dict[str, Any],
         metrics: dict[str, float] | None = None) -> None:
    """Starts an asynchronous save of `state` (a TrainState on one device) at its step."""
    arrays = _to_arrays(serialization.to_state_dict(state))
    step = int(arrays["step"])
    if step in manager.all_steps():
        return  # already saved at this step (e.g. an eval save followed by the final one)
    wait(manager)  # where an earlier asynchronous save's failure surfaces; then it is sealed
    ocp = _orbax()
    with _writing(manager):
        manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(arrays),
            meta=ocp.args.JsonSave({**meta, "step": step}),
        ), metrics=metrics)
    if hasattr(manager, "unsealed"):
        manager.unsealed.append(step)


def wait(manager: ocp.CheckpointManager) -> None:
    """Blocks until the pending asynchronous save is complete on disk, then seals it."""
    with _writing(manager):
        manager.wait_until_finished()
        for step in getattr(manager, "unsealed", ()):
            if jax.process_index() == 0 and (Path(manager.directory) / str(step)).is_dir():
                seal(Path(manager.directory) / str(step))
        if hasattr(manager, "unsealed"):
            manager.unsealed.clear()


# ------------------------------------------------------------------------------ integrity

def seal(step_dir: Path) -> None:
    """Writes the size and sha256 of every file of a finished step (atomically, last)."""
    files = {str(f.relative_to(step_dir)): {"bytes": f.stat().st_size, "sha256": _sha256(f)}
             for f in sorted(step_dir.rglob("*")) if f.is_file() and f.name != MANIFEST_FILE}
    tmp = step_dir / f"{MANIFEST_FILE}.tmp"
    with open(tmp, "w") as out:
        json.dump({"algorithm": "sha256", "files": files}, out, indent=1, sort_keys=True)
        out.flush()
        os.fsync(out.fileno())
    tmp.replace(step_dir / MANIFEST_FILE)


def verify(step_dir: Path) -> str | None:
    """Why a step's files are not those sealed (None if they are, or if it has no seal)."""
    manifest = step_dir / MANIFEST_FILE
    if not manifest.is_file():
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its checksum file {MANIFEST_FILE} is unreadable ({e})"
    for name, want in sorted(files.items()):
        f = step_dir / name
        try:
            size = f.stat().st_size
            if size != want["bytes"]:
                return (f"{name} has {size} bytes, {want['bytes']} were written "
                        f"({'truncated' if size < want['bytes'] else 'grown'})")
            if _sha256(f) != want["sha256"]:
                return f"{name} is not the file written (its sha256 differs): altered on disk"
        except FileNotFoundError:
            return f"{name} is missing"
        except OSError as e:
            return f"{name} cannot be read ({os.strerror(e.errno or 0) or e})"
    return None


def is_sealed(step_dir: Path) -> bool:
    return (step_dir / MANIFEST_FILE).is_file()


def intact_steps(manager: ocp.CheckpointManager) -> list[int]:
    """The steps whose files match their seal (or that have none), oldest first."""
    directory = Path(manager.directory)
    return [s for s in sorted(manager.all_steps()) if verify(directory / str(s)) is None]


def set_aside_after(manager: ocp.CheckpointManager, step: int) -> list[Path]:
    """Moves the steps after `step` (the damaged ones a resume passed over) to
    `<checkpoints>-damaged/<step>` (kept for inspection, never deleted): the steps the run
    saves again must not find their names taken."""
    directory = Path(manager.directory)
    later = [s for s in manager.all_steps() if s > step]
    moved = []
    for s in sorted(later):
        aside = directory.with_name(directory.name + "-damaged") / str(s)
        if aside.exists():
            aside = aside.with_name(f"{s}.{os.getpid()}")
        aside.parent.mkdir(parents=True, exist_ok=True)
        (directory / str(s)).rename(aside)
        _warn(f"moved the damaged checkpoint {directory / str(s)} to {aside}")
        moved.append(aside)
    if moved:
        manager.reload()
    return moved


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _damaged(manager: ocp.CheckpointManager, step: int, why: str,
             label: str = "") -> DamagedCheckpoint:
    others = [s for s in intact_steps(manager) if s != step]
    fix = (f"pass another step (intact: {', '.join(map(str, others))})" if others
           else "no other intact checkpoint is left there: start afresh with --overwrite or a "
                "new --workdir")
    return DamagedCheckpoint(f"checkpoint {manager.directory}/{step}{label} is damaged: {why}; "
                             f"{fix}")


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


# Orbax re-raises TensorStore's write errors as ValueError/RuntimeError with this suffix.
_OS_ERROR_CODE = re.compile(r"\[os_error_code='?(\d+)'?\]")


@contextlib.contextmanager
def _writing(manager: ocp.CheckpointManager):
    """Turns a failed checkpoint write (full disk, quota, permissions) into one line that says
    what failed and which complete checkpoint a rerun resumes from; other errors pass."""
    try:
        yield
    except Exception as e:
        code = os_error_code(e)
        if code is None:
            raise
        directory = Path(manager.directory)
        # The disk, not manager.all_steps(): Orbax lists a step as soon as its save starts.
        listed = directory.iterdir() if directory.is_dir() else ()
        done = sorted(int(p.name) for p in listed if p.name.isdigit())
        fix = ("free space there or use a --workdir with room" if code in NO_ROOM
               else "fix that or use another --workdir")
        resume = (f"it resumes from step {done[-1]}, the last complete checkpoint" if done
                  else "no checkpoint was completed, so it starts again")
        raise CheckpointError(f"could not write a checkpoint in {directory}: "
                              f"{os.strerror(code)}; {fix}, then rerun the same command: "
                              f"{resume}") from e


# Errors that mean the disk (or the user's quota or file-size limit) has no room.
NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def os_error_code(error: BaseException) -> int | None:
    """The operating system's error number if `error` is a failed file operation (an OSError,
    or Orbax's re-raised TensorStore error), else None."""
    if isinstance(error, OSError) and error.errno is not None:
        return error.errno
    found = _OS_ERROR_CODE.search(str(error))
    return int(found.group(1)) if found else None


def restore(manager: ocp.CheckpointManager, target: Any, step: int | str = "latest", *,
            fallback: bool = False, warn=_warn) -> tuple[Any, dict[str, Any]]:
    """Restores into the structure of `target` (a TrainState); returns (state, meta).

    Each step's files are checked against its seal first (see the module's docstring). With
    `fallback` ('latest' only: resuming), a damaged or unreadable step is passed over, with a
    `warn`ing, for the newest one that is intact; otherwise it is an error naming the step.
    """
    ocp = _orbax()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                            _to_arrays(serialization.to_state_dict(target)))
    chosen = resolve_step(manager, step)
    candidates = ([s for s in sorted(manager.all_steps(), reverse=True)]
                  if fallback and step == "latest" else [chosen])
    directory = Path(manager.directory)
    for i, s in enumerate(candidates):
        last = i == len(candidates) - 1
        why = verify(directory / str(s))
        if why is None:
            try:
                restored = manager.restore(s, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
            except (ValueError, KeyError, TypeError, RuntimeError, OSError) as e:
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                if is_sealed(directory / str(s)) or not fallback or last:
                    raise _mismatch(manager, s, reason) from None
                # Written without checksums: a damaged file looks like another model's.
                why = f"it cannot be read ({reason})"
        if why is not None:
            if not fallback or last:
                label = " (the best)" if step == "best" else ""
                raise _damaged(manager, s, why, label)
            warn(f"checkpoint {directory}/{s} is damaged: {why}; trying the one before it")
            continue
        _check_shapes(abstract, restored["state"], lambda w, s=s: _mismatch(manager, s, w))
        if s != candidates[0]:
            warn(f"resuming from step {s}, the newest intact checkpoint in {directory}")
        state = serialization.from_state_dict(target, _from_arrays(restored["state"], target))
        return state, dict(restored["meta"])
    raise AssertionError("unreachable")


def _mismatch(manager: ocp.CheckpointManager, step: int, why: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {manager.directory}/{step} does not fit this model and "
                           f"optimizer ({why}); use the config it was written with")


def _check_shapes(expected: Any, got: Any, error) -> None:
    """Orbax restores stored shapes as they are: a different model must fail here, loudly."""
    want = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    have = dict(jax.tree_util.tree_flatten_with_path(got)[0])
    for path in sorted(set(want) | set(have), key=str):
        name = jax.tree_util.keystr(path)
        if path not in have or path not in want:
            raise error(f"{name} is {'missing' if path not in have else 'unexpected'}")
        w, h = want[path], have[path]
        if tuple(w.shape) != tuple(np.shape(h)) or np.dtype(w.dtype) != np.asarray(h).dtype:
            raise error(f"{name} is {np.asarray(h).dtype}{list(np.shape(h))}, "
                        f"expected {np.dtype(w.dtype)}{list(w.shape)}")


def resolve_step(manager: ocp.CheckpointManager, step: int | str) -> int:
    """'latest', 'best' or a step number -> an existing step, or a clear error."""
    steps = manager.all_steps()
    if not steps:
        raise CheckpointError(f"no checkpoint in {manager.directory}")
    if step == "latest":
        return max(steps)
    if step == "best":
        scored = [(manager.metrics(s) or {}).get(BEST_METRIC) for s in steps]
        ranked = [(v, s) for v, s in zip(scored, steps) if v is not None]
        return max(ranked)[1] if ranked else max(steps)
    if int(step) not in steps:
        raise CheckpointError(
            f"no checkpoint at step {step} in {manager.directory}; have {sorted(steps)}")
    return int(step)


def read_meta(directory: str | Path, step: int | str = "latest") -> dict[str, Any]:
    """The JSON metadata of a checkpoint, without touching its arrays; 'latest' is the newest
    intact step."""
    with create_manager(directory, read_only=True, asynchronous=False) as manager:
        s = resolve_step(manager, step)
        if step == "latest":
            intact = intact_steps(manager)
            if not intact:
                raise _damaged(manager, s, verify(Path(directory) / str(s)) or "unreadable")
            s = intact[-1]
        else:
            _check_intact(manager, s, step)
        args = _orbax().args
        restored = manager.restore(s, args=args.Composite(meta=args.JsonRestore()))
    return dict(restored["meta"])


def _check_intact(manager: ocp.CheckpointManager, step: int, asked: int | str) -> None:
    why = verify(Path(manager.directory) / str(step))
    if why is not None:
        raise _damaged(manager, step, why, " (the best)" if asked == "best" else "")


def _to_arrays(tree: Any) -> Any:
    """Host numpy arrays; typed PRNG keys become their raw key data (Orbax stores plain arrays)."""
    def leaf(x):
        if isinstance(x, jax.ShapeDtypeStruct):  # an abstract target (jax.eval_shape)
            return x
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x)

    return jax.tree.map(leaf, tree)


def _from_arrays(tree: Any, target: Any) -> Any:
    """Re-wraps raw key data where the target holds a typed PRNG key."""
    target_rng = getattr(target, "rng", None)
    if target_rng is not None and jax.dtypes.issubdtype(target_rng.dtype, jax.dtypes.prng_key):
        tree = dict(tree)
        tree["rng"] = jax.random.wrap_key_data(tree["rng"], impl=jax.random.key_impl(target_rng))
    return tree


def restore_variables(directory: str | Path,
                      step: int | str = "best") -> tuple[dict[str, Any], dict[str, Any]]:
    """Only the model variables ({"params", "batch_stats"}) and meta of a checkpoint: the
    moving average's where the run kept one (what it evaluated and ranked as best).

    Needs no optimizer or data set: what prediction and export use.
    """
    with create_manager(directory, read_only=True, asynchronous=False) as manager:
        s = resolve_step(manager, step)
        _check_intact(manager, s, step)
        args = _orbax().args
        restored = manager.restore(s, args=args.Composite(state=args.StandardRestore(),
                                                          meta=args.JsonRestore()))
    tree = restored["state"]
    prefix = "ema_" if tree.get("ema_params") is not None else ""
    return ({"params": tree[prefix + "params"], "batch_stats": tree[prefix + "batch_stats"]},
            dict(restored["meta"]))
