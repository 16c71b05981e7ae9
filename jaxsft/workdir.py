"""The workdir belongs to one config: refuse another, never overwrite what a user has."""

from __future__ import annotations

import time
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


def config_diff(old: Config, new: Config) -> dict[str, tuple[object, object]]:
    """Run-defining fields whose values differ: {name: (old, new)}."""
    a, b = config_lib.to_flat(old), config_lib.to_flat(new)
    return {k: (a[k], b[k]) for k in a if k not in OPERATIONAL_FIELDS and a[k] != b[k]}


def prepare(cfg: Config, *, write: bool = True, clock=time.time) -> Path:
    """Creates the workdir or checks that it belongs to `cfg`; saves the resolved config.

    A workdir of another config is refused; with `--overwrite` its contents are moved aside
    to `<workdir>.replaced-<time>` (nothing is deleted) and the run starts afresh. A new
    length (`--steps`, `--epochs`) continues the run where its schedule allows (see
    `_check_continuation`).
    """
    workdir = Path(cfg.run.workdir)
    saved = workdir / CONFIG_FILE
    if saved.exists():
        try:
            old = config_lib.load(saved)
        except (ConfigError, ValueError) as e:
            raise ConfigError(f"{saved} is not a jaxsft config ({e}); use a new --workdir") \
                from None
        diff = config_diff(old, cfg)
        if diff and not cfg.run.overwrite:
            _check_continuation(workdir, diff, cfg, say=print if write else lambda _: None)
            diff = {}
        if diff and write:
            aside = workdir.with_name(f"{workdir.name}.replaced-{int(clock())}")
            workdir.rename(aside)
            print(f"moved the old run in {workdir} to {aside}")
    if write:
        workdir.mkdir(parents=True, exist_ok=True)
        tmp = saved.with_suffix(".json.tmp")
        config_lib.save(cfg, tmp)
        tmp.replace(saved)  # atomic: a crash leaves the old config or the new, never half
    return workdir


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
