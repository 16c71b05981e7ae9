"""Two processes x 2 CPU devices (gloo) == one process x 4 devices, resumed by one process."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import FAST_COMPILE, image_folder, noise

from jaxsft import checkpoint
from jaxsft.trainer import CHECKPOINT_DIR

# gloo's C++ connection notice; its threads can write two at once, splitting one across lines:
# "[Gloo] Rank 1 is connected to [Gloo] Rank 1 is connected to 3 peer ranks. ...\n3 peer ..."
GLOO_NOTICE = re.compile(r"\[Gloo\] Rank \d+ is connected to |"
                         r"\d+ peer ranks\. Expected number of connected peer ranks is : \d+")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Noise images: well-conditioned BatchNorm statistics. (Near-constant images on tiny
    maps amplify rounding differences: 1e-16 became 4e-7 in 6 steps, 2 vs 4 devices.)"""
    return image_folder(tmp_path_factory.mktemp("noise"), {"train": 16, "test": 7}, ("c0", "c1"),
                        noise, seed=1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def env_with_devices(n: int) -> dict:
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n} {FAST_COMPILE}"}


def train_flags(folder: Path, workdir: Path, steps: int) -> list[str]:
    """Float64 (JAX x64), so two correct reductions agree to ~1e-15 instead of parting by
    rounding. Pad-and-crop + flip and a batch of 16 of the 32 train images (2 steps per
    epoch): the global batch depends on the step alone, not on who reads it. (Noise images
    and 4 per device keep BatchNorm well conditioned: RandomResizedCrop's upscaled small crops
    of 16x16 images, 2 per device, amplified 1e-16 to 1e-10 in 6 steps.)"""
    return [sys.executable, "-m", "jaxsft.train", "--model", "resnet18",
            "--dataset", f"folder:{folder}", "--image-size", "16", "--augment", "light",
            "--batch-size", "16", "--lr", "0.05", "--steps", str(steps), "--log-every", "1",
            "--eval-every", "2", "--dtype", "float64", "--workdir", str(workdir)]


def launch_two(folder: Path, workdir: Path, steps: int) -> list[subprocess.Popen]:
    address = f"localhost:{free_port()}"
    return [subprocess.Popen(
        train_flags(folder, workdir, steps) + ["--coordinator-address", address,
                                               "--num-processes", "2", "--process-id", str(i)],
        env=env_with_devices(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]


def wait_all(procs, timeout=600):
    outs = [p.communicate(timeout=timeout) for p in procs]
    return [p.returncode for p in procs], outs


def variables(workdir: Path):
    with jax.enable_x64(True):
        v, _ = checkpoint.restore_variables(workdir / CHECKPOINT_DIR, "latest")
    return v


def assert_close(a, b, rtol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        scale = max(np.abs(y).max(), 1e-30)
        assert np.abs(x - y).max() / scale < rtol


def test_two_processes_then_one_equal_one_process_with_four_devices(folder, tmp_path):
    """6 steps of 1 process x 4 devices == 3 steps of 2 processes x 2 devices, resumed from
    their collective checkpoint by 1 process x 4 devices for 3 more (from mid-epoch)."""
    one = subprocess.run(train_flags(folder, tmp_path / "one", 6), env=env_with_devices(4),
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr

    codes, outs = wait_all(launch_two(folder, tmp_path / "two", 3))
    assert codes == [0, 0], outs
    # Only process 0 prints and writes (gloo's own C++ connection notices aside).
    assert GLOO_NOTICE.sub("", outs[1][0]).split() == [], outs[1][0]
    assert checkpoint.create_manager(tmp_path / "two" / CHECKPOINT_DIR,
                                     read_only=True).all_steps()[-1] == 3

    resumed = subprocess.run(train_flags(folder, tmp_path / "two", 6), env=env_with_devices(4),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {tmp_path / 'two' / CHECKPOINT_DIR} at step 3" in resumed.stdout

    assert_close(variables(tmp_path / "two"), variables(tmp_path / "one"), rtol=1e-10)
    last_two, last_one = last_eval(tmp_path / "two"), last_eval(tmp_path / "one")
    assert last_two["count"] == last_one["count"] == 14  # every example once
    assert last_two["top1"] == last_one["top1"]
    assert abs(last_two["loss"] - last_one["loss"]) <= 1e-10 * abs(last_one["loss"])


def test_two_processes_stopped_together_resume_collectively(folder, tmp_path):
    """SIGTERM to both mid-run saves collectively; restarted, both resume from there."""
    procs = launch_two(folder, tmp_path / "two", 6)
    metrics_file = tmp_path / "two" / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and all(p.poll() is None for p in procs):
        if metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= 2:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    codes, outs = wait_all(procs)
    assert codes == [128 + signal.SIGTERM] * 2, outs
    stopped_at = max(checkpoint.create_manager(tmp_path / "two" / CHECKPOINT_DIR,
                                               read_only=True).all_steps())
    assert 1 <= stopped_at < 6
    codes, outs = wait_all(launch_two(folder, tmp_path / "two", 6))
    assert codes == [0, 0], outs
    assert f"resumed from {tmp_path / 'two' / CHECKPOINT_DIR} at step {stopped_at}" in outs[0][0]


def last_eval(workdir: Path) -> dict:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "eval"][-1]


def test_unreachable_coordinator_fails_in_bounded_time_with_a_clear_message(tmp_path):
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "jaxsft.train", "--workdir", str(tmp_path / "w"),
         "--coordinator-address", f"localhost:{free_port()}", "--num-processes", "2",
         "--process-id", "1", "--distributed-timeout", "3"],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert time.monotonic() - start < 60
    assert out.stderr.strip().splitlines()[-1].startswith(
        "python -m jaxsft.train: error: could not reach the coordinator at localhost:")
