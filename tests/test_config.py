"""Config: flags mirror the dataclasses, files load, invalid settings fail with one line."""

import json
import subprocess
import sys

import pytest

from jaxsft import config
from jaxsft.config import Config, ConfigError
from jaxsft.train import build_parser


def parse(*argv: str) -> Config:
    return config.from_args(build_parser().parse_args(list(argv)))


def test_defaults_reproduce_the_seed_optimizer():
    cfg = Config()
    assert (cfg.optim.optimizer, cfg.optim.lr, cfg.optim.momentum) == ("sgd", 0.01, 0.9)
    assert (cfg.optim.nesterov, cfg.optim.weight_decay, cfg.run.label_smoothing) == (False, 0, 0)


def test_every_field_is_a_flag_with_its_default_in_help():
    help_text = build_parser().format_help()
    for name in config.FLAT_FIELDS:
        flag = "--" + name.replace("_", "-")
        assert flag in help_text, flag
    assert "(default: 0.01)" in help_text


def test_flags_override_and_types():
    cfg = parse("--model", "resnet50", "--lr", "0.1", "--nesterov", "--steps", "7",
                "--milestones", "30", "60", "--schedule", "multistep", "--no-cache")
    assert cfg.model.model == "resnet50" and cfg.optim.lr == 0.1 and cfg.optim.nesterov
    assert cfg.run.steps == 7 and cfg.optim.milestones == (30.0, 60.0) and not cfg.data.cache


def test_json_and_python_config_files_then_flags_on_top(tmp_path):
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"optim": {"lr": 0.5}, "batch_size": 32}))
    cfg = parse("--config", str(j), "--batch-size", "16")
    assert cfg.optim.lr == 0.5 and cfg.data.batch_size == 16
    py = tmp_path / "c.py"
    py.write_text("from jaxsft.config import Config\n"
                  "def get_config():\n    return Config().replace(model='resnet34')\n")
    assert parse("--config", str(py)).model.model == "resnet34"


def test_save_load_round_trip(tmp_path):
    cfg = Config().replace(lr=0.2, milestones=(3.0,), schedule="multistep", weights="x.pth")
    config.save(cfg, tmp_path / "c.json")
    assert config.load(tmp_path / "c.json") == cfg


@pytest.mark.parametrize("flat, fragment", [
    ({"lr": -1.0}, "--lr must be positive"),
    ({"nesterov": True, "momentum": 0.0}, "--nesterov needs a positive --momentum"),
    ({"schedule": "multistep"}, "needs --milestones"),
    ({"recipe": "linear-probe"}, "needs --weights"),
    ({"label_smoothing": 1.0}, "--label-smoothing"),
    ({"dtype": "int8"}, "--dtype 'int8' is not one of"),
    ({"no_such_field": 1}, "unknown config field"),
    ({"lr": "fast"}, "expects float"),
])
def test_invalid_settings_fail_with_one_clear_line(flat, fragment):
    with pytest.raises(ConfigError, match=fragment) as e:
        Config().replace(**flat)
    assert "\n" not in str(e.value)


def test_cli_refuses_invalid_combination_before_jax_starts():
    bad = subprocess.run([sys.executable, "-m", "jaxsft.train", "--lr", "-1"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "python -m jaxsft.train: error: --lr must be positive, got -1.0"
    probe = subprocess.run([sys.executable, "-c", (
        "import sys, jaxsft.train as t\n"
        "try:\n    t.main(['--nesterov', '--momentum', '0'])\n"
        "except ValueError:\n    print('jax' in sys.modules)")],
        capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip() == "False", probe.stderr
