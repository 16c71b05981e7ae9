"""Orbax checkpoints: exact round trip, latest + best kept, interrupted saves ignored, damaged
steps named and passed over."""

import errno
import logging
import shutil
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct

from jaxsft import checkpoint
from jaxsft.checkpoint import CheckpointError


class State(struct.PyTreeNode):
    step: jax.Array
    params: dict
    opt_state: optax.OptState
    rng: jax.Array
    tx: optax.GradientTransformation = struct.field(pytree_node=False)


def make_state(step=0, seed=0):
    params = {"w": jax.random.normal(jax.random.key(seed), (3, 4)), "b": jnp.arange(4.0)}
    tx = optax.sgd(0.1, momentum=0.9)
    opt_state = jax.tree.map(lambda x: x + seed, tx.init(params))
    return State(step=jnp.asarray(step), params=params, opt_state=opt_state,
                 rng=jax.random.key(seed), tx=tx)


def assert_same(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_bit_exact_including_optimizer_and_typed_rng(tmp_path):
    saved = make_state(step=5, seed=3)
    with checkpoint.create_manager(tmp_path, keep=2) as m:
        checkpoint.save(m, saved, {"data_position": 5, "class_names": ["a", "b"]})
        m.wait_until_finished()
        restored, meta = checkpoint.restore(m, make_state(), "latest")
    assert_same(saved, restored)
    assert meta == {"data_position": 5, "class_names": ["a", "b"], "step": 5}
    assert checkpoint.read_meta(tmp_path)["data_position"] == 5


def test_keeps_latest_n_and_the_best(tmp_path):
    top1 = {1: 0.5, 2: 0.9, 3: 0.4, 4: 0.3, 5: 0.2}
    with checkpoint.create_manager(tmp_path, keep=2) as m:
        for step, acc in top1.items():
            checkpoint.save(m, make_state(step), {}, metrics={"top1": acc})
            m.wait_until_finished()
        assert sorted(m.all_steps()) == [2, 4, 5]
        assert checkpoint.resolve_step(m, "best") == 2
        assert checkpoint.resolve_step(m, "latest") == 5
        with pytest.raises(CheckpointError, match=r"no checkpoint at step 3 .* have \[2, 4, 5\]"):
            checkpoint.resolve_step(m, 3)


def test_interrupted_save_is_ignored_in_favour_of_the_last_complete_one(tmp_path):
    with checkpoint.create_manager(tmp_path) as m:
        checkpoint.save(m, make_state(7, seed=1), {})
        m.wait_until_finished()
    # What a crash during a save leaves behind: Orbax's temporary directory, half written.
    partial = tmp_path / "9.orbax-checkpoint-tmp-1234567"
    shutil.copytree(tmp_path / "7", partial)
    for f in partial.rglob("*"):
        if f.is_file():
            f.write_bytes(f.read_bytes()[:10])
    with checkpoint.create_manager(tmp_path) as m:
        assert m.all_steps() == [7]
        restored, _ = checkpoint.restore(m, make_state(), "latest")
        assert int(restored.step) == 7
        # The resumed run reaches step 9 again and saves it. Orbax removes the leftover in the
        # background on restart and finishes that before the next save begins.
        checkpoint.save(m, make_state(9, seed=2), {})
        m.wait_until_finished()
        assert m.all_steps() == [7, 9]
        assert not partial.exists()
        restored, _ = checkpoint.restore(m, make_state(), "latest")
    assert_same(restored, make_state(9, seed=2))


def test_restore_into_a_different_model_names_the_fix(tmp_path):
    with checkpoint.create_manager(tmp_path) as m:
        checkpoint.save(m, make_state(1), {})
        m.wait_until_finished()
        other = make_state().replace(params={"w": jnp.zeros((5, 5)), "b": jnp.zeros(4)})
        with pytest.raises(CheckpointError, match="use the config it was written with"):
            checkpoint.restore(m, other)


def test_empty_directory_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        checkpoint.read_meta(tmp_path)


def test_saves_without_metrics_do_not_log_orbaxs_warning(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
    for name in ("absl", "asyncio"):
        monkeypatch.setattr(logging.getLogger(name), "filters", [])
    checkpoint.quiet_orbax()  # what jaxsft.setup() does for the CLIs
    with caplog.at_level("WARNING"), checkpoint.create_manager(tmp_path) as m:
        checkpoint.save(m, make_state(1), {})
        m.wait_until_finished()
    assert m.all_steps() == [1]
    assert not [r for r in caplog.records if "metrics" in r.getMessage()], caplog.text


# What Orbax raises when TensorStore's background write fails (the text of a real full disk).
ORBAX_FULL_DISK = ValueError(
    'RESOURCE_EXHAUSTED: Error writing "params.w/0" in OCDBT database at local file '
    '"ckpt/8.orbax-checkpoint-tmp/state": Failed to write 40599552 bytes to file 15: No space '
    "left on device [os_error_code='28']")


def raising(error):
    def fail(*args, **kwargs):
        raise error
    return fail


def test_a_failed_write_says_why_and_which_step_a_rerun_resumes_from(tmp_path, monkeypatch):
    with checkpoint.create_manager(tmp_path) as m:
        checkpoint.save(m, make_state(3), {})
        checkpoint.wait(m)
        with monkeypatch.context() as patch:
            patch.setattr(m, "wait_until_finished", raising(ORBAX_FULL_DISK))
            with pytest.raises(CheckpointError) as failed:
                checkpoint.wait(m)
            patch.setattr(m, "wait_until_finished", lambda: None)
            patch.setattr(m, "save", raising(PermissionError(errno.EACCES, "Permission denied")))
            with pytest.raises(CheckpointError, match="Permission denied; fix that or use another "
                                                      "--workdir, then rerun .* from step 3"):
                checkpoint.save(m, make_state(4), {})
            # Anything that is not a failed file operation is a bug: it keeps its traceback.
            patch.setattr(m, "save", raising(TypeError("a bug")))
            with pytest.raises(TypeError, match="a bug"):
                checkpoint.save(m, make_state(4), {})
        assert m.all_steps() == [3]
    assert str(failed.value) == (
        f"could not write a checkpoint in {tmp_path}: No space left on device; free space there "
        "or use a --workdir with room, then rerun the same command: it resumes from step 3, the "
        "last complete checkpoint")


def test_a_failed_write_before_any_checkpoint_says_the_rerun_starts_again(tmp_path):
    with checkpoint.create_manager(tmp_path) as m, pytest.raises(
            CheckpointError, match="no checkpoint was completed, so it starts again$"):
        with checkpoint._writing(m):
            raise OSError(errno.ENOSPC, "No space left on device")


def test_orbax_noise_after_a_failed_write_is_one_line_per_thread():
    record = logging.LogRecord("absl", logging.ERROR, __file__, 1, "save failed", None,
                               (ValueError, ORBAX_FULL_DISK, None))
    assert checkpoint._OrbaxNoise().filter(record) and record.exc_info is None
    record = logging.LogRecord("asyncio", logging.ERROR, __file__, 1, "Task exception was never "
                               "retrieved", None, (ValueError, ORBAX_FULL_DISK, None))
    assert not checkpoint._OrbaxNoise().filter(record)
    bug = ValueError("unrelated")
    record = logging.LogRecord("absl", logging.ERROR, __file__, 1, "m", None,
                               (ValueError, bug, None))
    assert checkpoint._OrbaxNoise().filter(record) and record.exc_info[1] is bug

    seen = []
    hook = checkpoint._ClosedLoopHook(previous=seen.append)
    closed = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"))
    other = types.SimpleNamespace(exc_value=RuntimeError("something else"))
    hook(closed)
    hook(other)
    assert seen == [other]


def test_quiet_orbax_installs_its_filters_and_hook_once(monkeypatch):
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
    for name in ("absl", "asyncio"):
        monkeypatch.setattr(logging.getLogger(name), "filters", [])
    checkpoint.quiet_orbax()
    checkpoint.quiet_orbax()
    for name in ("absl", "asyncio"):
        assert [type(f) for f in logging.getLogger(name).filters] == [checkpoint._OrbaxNoise]
    assert isinstance(sys.unraisablehook, checkpoint._ClosedLoopHook)
    assert not isinstance(sys.unraisablehook.previous, checkpoint._ClosedLoopHook)


def saved_steps(directory, steps=(1, 2)):
    """Checkpoints at `steps`, each sealed (checksummed) as the trainer's saves are."""
    with checkpoint.create_manager(directory, keep=5) as m:
        for step in steps:
            checkpoint.save(m, make_state(step, seed=step), {"step_seed": step})
        checkpoint.wait(m)
    return directory


def largest_file(step_dir):
    return max((f for f in step_dir.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)


def truncate(f):
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def scribble(f):
    """Garbage over the middle of the file, its size unchanged."""
    data = bytearray(f.read_bytes())
    mid = len(data) // 2
    data[mid - 64: mid + 64] = np.random.default_rng(0).bytes(len(data[mid - 64: mid + 64]))
    f.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, why", [(truncate, "truncated"),
                                         (scribble, "sha256 differs"),
                                         (lambda f: f.unlink(), "is missing")])
def test_a_damaged_step_is_named_and_resuming_falls_back_to_the_newest_intact_one(
        tmp_path, damage, why):
    saved_steps(tmp_path)
    assert (tmp_path / "2" / checkpoint.MANIFEST_FILE).is_file()
    damage(largest_file(tmp_path / "2" / "state"))
    warnings = []
    with checkpoint.create_manager(tmp_path, read_only=True) as m:
        with pytest.raises(checkpoint.DamagedCheckpoint,
                           match=rf"checkpoint {tmp_path}/2 is damaged: .*{why}.*intact: 1"):
            checkpoint.restore(m, make_state(), 2)
        with pytest.raises(checkpoint.DamagedCheckpoint, match=rf"{tmp_path}/2 is damaged"):
            checkpoint.restore(m, make_state(), "latest")  # no fallback: never another step
        restored, meta = checkpoint.restore(m, make_state(), "latest", fallback=True,
                                            warn=warnings.append)
        assert checkpoint.intact_steps(m) == [1]
    assert_same(restored, make_state(1, seed=1)) and meta["step_seed"] == 1
    assert len(warnings) == 2 and f"{tmp_path}/2 is damaged" in warnings[0]
    assert "resuming from step 1" in warnings[1]
    assert checkpoint.read_meta(tmp_path)["step"] == 1  # 'latest' meta: the newest intact
    with pytest.raises(checkpoint.DamagedCheckpoint, match=rf"{tmp_path}/2 is damaged"):
        checkpoint.restore_variables(tmp_path, 2)


def test_when_every_step_is_damaged_resuming_says_so_and_loads_nothing(tmp_path):
    saved_steps(tmp_path)
    for step in (1, 2):
        scribble(largest_file(tmp_path / str(step) / "state"))
    with checkpoint.create_manager(tmp_path, read_only=True) as m, pytest.raises(
            checkpoint.DamagedCheckpoint, match=r"/1 is damaged: .*no other intact checkpoint"):
        checkpoint.restore(m, make_state(), "latest", fallback=True, warn=lambda _: None)


def test_the_steps_after_the_one_resumed_are_set_aside_not_deleted(tmp_path):
    saved_steps(tmp_path / "checkpoints", steps=(1, 2, 3))
    with checkpoint.create_manager(tmp_path / "checkpoints") as m:
        checkpoint.set_aside_after(m, 1)
        assert m.all_steps() == [1]
        checkpoint.save(m, make_state(2, seed=5), {})
        checkpoint.wait(m)
        assert m.all_steps() == [1, 2]
    assert sorted(p.name for p in (tmp_path / "checkpoints-damaged").iterdir()) == ["2", "3"]
