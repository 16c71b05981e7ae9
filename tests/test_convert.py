"""python -m jaxsft.convert: round trip against torchvision, overwrite rules, errors."""

import errno
import hashlib
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
import torchvision
from helpers import run_module_with_file_size_limit

import jaxsft
from jaxsft import convert
from jaxsft.weights import WeightsError, load_weights


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "jaxsft.convert", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


def torchvision_state_dict(seed=0):
    torch.manual_seed(seed)
    return torchvision.models.resnet18().state_dict()


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision_state_dict(), path)
    return path


def assert_matches_torchvision(variables, skip_head=False):
    expected = torchvision_state_dict()
    params, stats = variables["params"], variables["batch_stats"]
    np.testing.assert_array_equal(params["conv1"]["kernel"],
                                  expected["conv1.weight"].permute(2, 3, 1, 0))
    np.testing.assert_array_equal(params["layer3_0"]["downsample_0"]["kernel"],
                                  expected["layer3.0.downsample.0.weight"].permute(2, 3, 1, 0))
    np.testing.assert_array_equal(stats["layer4_1"]["bn2"]["var"],
                                  expected["layer4.1.bn2.running_var"])
    if not skip_head:
        np.testing.assert_array_equal(params["fc"]["kernel"], expected["fc.weight"].T)


def test_help():
    result = run_cli("--help")
    assert result.returncode == 0
    for flag in ("--arch", "--source", "--out", "--num-classes", "--force", "resnext101_64x4d"):
        assert flag in result.stdout


def test_round_trip_refusal_and_force(source, tmp_path):
    out = tmp_path / "converted"
    result = run_cli("--arch", "resnet18", "--source", source, "--out", out)
    assert result.returncode == 0, result.stderr
    meta = json.loads((out / "jaxsft_weights.json").read_text())
    assert meta["arch"] == "resnet18" and meta["num_classes"] == 1000
    assert meta["source"] == str(source)
    assert meta["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert meta["jaxsft_version"] == jaxsft.__version__
    assert_matches_torchvision(load_weights(out, "resnet18"))
    with pytest.raises(WeightsError, match="holds resnet18 weights, not resnet34: "
                                           "pass arch='resnet18'"):
        load_weights(out, "resnet34")

    before = (out / "jaxsft_weights.json").read_text()
    result = run_cli("--arch", "resnet18", "--source", source, "--out", out,
                     "--num-classes", "10")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "pass --force" in result.stderr
    assert (out / "jaxsft_weights.json").read_text() == before

    result = run_cli("--arch", "resnet18", "--source", source, "--out", out,
                     "--num-classes", "10", "--seed", "3", "--force")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "jaxsft_weights.json").read_text())["num_classes"] == 10
    variables = load_weights(out, "resnet18")
    assert variables["params"]["fc"]["kernel"].shape == (512, 10)
    assert_matches_torchvision(variables, skip_head=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted", "resnet18.pth"]


def test_errors_are_one_line_with_status_2(source, tmp_path):
    cases = [
        ("--arch", "resnet34", "--source", source, "--out", tmp_path / "a"),  # wrong arch
        ("--arch", "resnet18", "--source", tmp_path / "nope.pth", "--out", tmp_path / "b"),
        ("--arch", "resnet19", "--source", source, "--out", tmp_path / "c"),  # unknown arch
        ("--arch", "resnet18", "--out", tmp_path / "d"),  # no --source
    ]
    expected = ["holds resnet18 weights, not resnet34", "does not exist", "invalid choice",
                "required: --source"]
    for args, message in zip(cases, expected, strict=True):
        result = run_cli(*args)
        assert result.returncode == 2, args
        assert result.stderr.strip().count("\n") == 0, result.stderr
        assert message in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resnet18.pth"]


def test_a_full_disk_is_one_line_and_leaves_nothing(source, tmp_path):
    # A real failed write inside Orbax: the converted weights (~45 MB) are one file.
    result = run_module_with_file_size_limit("jaxsft.convert", "--arch", "resnet18", "--source",
                                             str(source), "--out", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"python -m jaxsft.convert: error: could not write in {tmp_path}: File too large; free "
        "space there or choose another --out"), result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resnet18.pth"]


@pytest.mark.parametrize("code,fix", [(errno.EDQUOT, "free space there"),
                                      (errno.EACCES, "fix that")])
def test_a_failed_orbax_write_names_the_fix_for_its_reason(tmp_path, monkeypatch, code, fix):
    import orbax.checkpoint as ocp

    class FailingCheckpointer(ocp.StandardCheckpointer):  # fails as Orbax re-raises TensorStore
        def save(self, directory, *args, **kwargs):
            raise ValueError(f"Error writing in {directory} [os_error_code='{code}']")

    monkeypatch.setattr(ocp, "StandardCheckpointer", FailingCheckpointer)
    with pytest.raises(OSError) as failed:
        convert._write(tmp_path / "part", {}, {})
    assert str(failed.value) == (f"could not write in {tmp_path}: {os.strerror(code)}; {fix} or "
                                 "choose another --out")


def test_a_failed_write_is_removed_after_writes_still_in_flight(source, tmp_path, monkeypatch):
    # Orbax raises at the first failed write while TensorStore finishes the others in the
    # background, creating missing parent directories: the temporary directory must not
    # come back once convert has raised.
    writers = []

    def failing_write(directory, variables, meta):
        def late_write():
            time.sleep(0.3)
            (directory / "variables" / "d").mkdir(parents=True, exist_ok=True)
            (directory / "variables" / "d" / "chunk").write_bytes(b"late")

        writers.append(threading.Thread(target=late_write))
        writers[0].start()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(convert, "_write", failing_write)
    with pytest.raises(OSError, match="No space left"):
        convert.convert("resnet18", str(source), tmp_path / "out")
    writers[0].join()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resnet18.pth"]


def test_file_url_source_and_converted_source(source, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXSFT_CACHE", str(tmp_path / "cache"))
    first = convert.convert("resnet18", source.as_uri(), tmp_path / "from_url")
    meta = json.loads((first / "jaxsft_weights.json").read_text())
    assert meta["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    second = convert.convert("resnet18", str(first), tmp_path / "again", num_classes=5)
    assert json.loads((second / "jaxsft_weights.json").read_text())["sha256"] == meta["sha256"]
    assert_matches_torchvision(load_weights(second, "resnet18"), skip_head=True)


def test_a_failed_write_leaves_nothing(source, tmp_path, monkeypatch, capsys):
    def broken(directory, variables, meta):
        (directory / "partial").write_text("half")
        raise OSError("disk full")

    monkeypatch.setattr(convert, "_write", broken)
    out = tmp_path / "out"
    assert convert.main(["--arch", "resnet18", "--source", str(source), "--out", str(out)]) == 2
    assert "disk full" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resnet18.pth"]
