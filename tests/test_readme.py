"""The README stays true: its set-up commands are what CI runs, its CLI table is complete."""

import re
from pathlib import Path

from jaxsft import config

ROOT = Path(__file__).resolve().parents[1]


def setup_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section, re.S)


def test_readme_has_exactly_two_setup_commands_and_ci_runs_both_verbatim():
    commands = setup_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    assert "python -m jaxsft.demo" in commands[0] and "pytest" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text()
    for c in commands:
        assert c in ci


def test_cli_reference_rows_match_the_config_fields():
    """Each field's README row carries its current default and help text."""
    lines = (ROOT / "README.md").read_text().splitlines()
    for name, (_, field) in config.FLAT_FIELDS.items():
        row = next((line for line in lines
                    if line.startswith(f"| `--{name.replace('_', '-')}` |")), None)
        assert row is not None, name
        default = "" if field.default is None else ("()" if field.default == () else field.default)
        help_text = field.metadata["help"].replace("%%", "%").replace("|", "\\|")
        assert row.startswith(f"| `--{name.replace('_', '-')}` | {default} | {help_text}"), name
