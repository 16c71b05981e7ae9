"""`python -m jaxsft.sweep --grid lr=0.003,0.01 --grid weight_decay=0,1e-4 ...`: a small grid
of settings, each trained and ranked on a validation split held out of the training split;
with `--retrain`, the best settings trained again on the whole training split and tested.

The protocol is Kornblith et al. (2019)'s: settings are chosen on a validation split carved
from the training split, the eval (test) split is never looked at while choosing, and the
chosen settings are then trained on all of the training split (train + val) and evaluated
once on the eval split.

Every `python -m jaxsft.train` flag sets the base config; each `--grid FIELD=V1,V2,...`
varies one config field, and the trials are the product of the grids, in the order given.
A trial trains with `jaxsft.trainer.fit` in `<workdir>/trials/<name>` (e.g.
`lr=0.01,weight_decay=0.0001`) on `--train-split` less a seeded `--holdout` fraction
(`jaxsft.data.holdout_splits`), evaluates on that held-out part, and is ranked by its final
validation top-1 (then loss). `<workdir>/sweep.json` holds the sweep (its definition, one
record per trial, the retrained run) and `<workdir>/sweep.md` the ranked table; both are
rewritten after each trial. A trial whose loss diverges (TrainingError) is recorded as failed
and ranked last, and the sweep goes on.

Rerunning the same command skips the trials already recorded and resumes an interrupted one
through fit's own resume. A workdir of another sweep (another base config, grid or holdout)
or of a training run is refused with one line; nothing there is changed.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import hashlib
import itertools
import json
import math
import re
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args, get_origin, get_type_hints

from jaxsft import cli, config, train
from jaxsft import workdir as workdir_lib
from jaxsft.config import Config, ConfigError, DataConfig

if TYPE_CHECKING:
    from jaxsft.data import DatasetInfo

PROG = "python -m jaxsft.sweep"
SWEEP_FILE = "sweep.json"
TABLE_FILE = "sweep.md"
TRIALS_DIR = "trials"
BEST_DIR = "best"
DEFAULT_HOLDOUT = 0.2
# What all trials share: the data they are trained and ranked on, and where they run.
FIXED_FIELDS = frozenset({"workdir", "dataset", "data_dir", "train_split", "eval_split",
                          "val_fraction", "overwrite"})
NAME_LIMIT = 120  # characters of a trial's directory name before it is cut and hashed
PROTOCOL = ("Kornblith et al. 2019: each trial is ranked by its final top-1 on a validation "
            "split held out of the training split; the eval split is not used to choose")

Grid = dict[str, tuple[Any, ...]]
InfoOf = Callable[[DataConfig], "DatasetInfo"]  # a data set's DatasetInfo, read once per sweep


# ---------------------------------------------------------------------------- the grid


def parse_grid(specs: Sequence[str], base: Config) -> Grid:
    """`FIELD=V1,V2,...` specs -> {field: values}, in the order given; each value is parsed
    with the field's type and checked by the config's own validation on top of `base`."""
    grid: Grid = {}
    for spec in specs:
        name, values = _parse_spec(spec, base)
        if name in grid:
            raise ConfigError(f"--grid {name} is given twice: list all its values in one "
                              f"--grid {name}=V1,V2,...")
        grid[name] = values
    return grid


def _parse_spec(spec: str, base: Config) -> tuple[str, tuple[Any, ...]]:
    field, sep, text = spec.partition("=")
    if not sep or not field.strip() or not text.strip():
        raise ConfigError(f"--grid {spec!r} is not FIELD=V1,V2,...: write e.g. "
                          "--grid lr=0.003,0.01,0.03")
    name = field_name(field)
    texts = [t.strip() for t in text.split(",")]
    values = tuple(parse_value(name, t) for t in texts)
    for i, (t, value) in enumerate(zip(texts, values)):
        if value in values[:i]:
            same = texts[values.index(value)]
            raise ConfigError(f"--grid {name} lists one value twice ({same}, {t}): give each "
                              "value once")
        try:
            base.replace(**{name: value})
        except ConfigError as e:
            raise ConfigError(f"--grid {name}={t}: {e}") from None
    if name == "model":
        _check_models(values)
    return name, values


def field_name(text: str) -> str:
    """A config field by its flat name (`weight_decay`) or flag spelling (`--weight-decay`)."""
    name = text.strip().removeprefix("--").replace("-", "_")
    if name in FIXED_FIELDS:
        raise ConfigError(f"--grid {text}: all trials share --{name.replace('_', '-')} (the "
                          "data they are ranked on and where they run); give it once, as a flag")
    if name not in config.FLAT_FIELDS:
        close = difflib.get_close_matches(name, list(config.FLAT_FIELDS), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"--grid {text}: no such setting{hint}; use the name of a "
                          "python -m jaxsft.train flag, e.g. lr or weight-decay")
    return name


TRUE, FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def parse_value(name: str, text: str) -> Any:
    """One grid value of field `name`, from text: numbers, true/false, `none` for an optional
    field, and numbers separated by spaces for a tuple (`--grid "milestones=30 60,10 20"`)."""
    typ = _field_type(name)
    args = [a for a in get_args(typ) if a is not type(None)]
    optional = type(None) in get_args(typ)
    if optional and text.lower() in ("none", "null"):
        return None
    kind = args[0] if optional else typ
    try:
        value = _convert(kind, text)
    except ValueError:
        raise ConfigError(f"--grid {name}={text}: {name} takes {_kind_text(kind)}"
                          + (" or none" if optional else "")) from None
    return value


def _convert(kind: Any, text: str) -> Any:
    if get_origin(kind) is tuple:
        return tuple(_finite(float(x)) for x in text.split())
    if kind is bool:
        if text.lower() not in TRUE + FALSE:
            raise ValueError(text)
        return text.lower() in TRUE
    if kind is float:
        return _finite(float(text))
    return kind(text)


def _finite(x: float) -> float:
    if not math.isfinite(x):
        raise ValueError(x)
    return x


def _kind_text(kind: Any) -> str:
    if get_origin(kind) is tuple:
        return "numbers separated by spaces"
    return {bool: "true or false", int: "an integer", float: "a finite number"}.get(
        kind, "a string")


def _field_type(name: str) -> Any:
    section, _ = config.FLAT_FIELDS[name]
    return get_type_hints(get_type_hints(Config)[section])[name]


def _check_models(names: Sequence[str]) -> None:
    from jaxsft.models import ARCHITECTURES

    for name in names:
        if name not in ARCHITECTURES:
            raise ConfigError(f"--grid model={name}: unknown architecture; known: "
                              f"{', '.join(sorted(ARCHITECTURES))}")


def trials(grid: Grid) -> list[dict[str, Any]]:
    """The grid's settings, one dict per trial: the product, the first field slowest."""
    return [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]


def value_text(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return " ".join(value_text(v) for v in value)
    return str(value)


def trial_name(settings: dict[str, Any]) -> str:
    """A readable directory name, `lr=0.01,weight_decay=0.0`; where a value is not safe in
    a path (a slash, a space) or the name is long, it is cut and a hash of the exact values
    keeps it unique."""
    exact = ",".join(f"{k}={value_text(v)}" for k, v in settings.items())
    safe = re.sub(r"[^A-Za-z0-9._=,+-]", "_", exact)
    if safe == exact and len(safe) <= NAME_LIMIT:
        return safe
    return f"{safe[:NAME_LIMIT]}-{hashlib.sha256(exact.encode()).hexdigest()[:8]}"


def trial_config(base: Config, settings: dict[str, Any], workdir: Path,
                 splits: tuple[str, str], given: Collection[str] = (),
                 info_of: InfoOf | None = None) -> Config:
    """A trial's config: trained on the rest of the training split, evaluated on the
    held-out part, in its own workdir; --recipe auto/seed resolved with the grid's
    settings and the flags `given` kept as set."""
    return _resolved(base.replace(**settings, workdir=str(workdir), train_split=splits[0],
                                  eval_split=splits[1], overwrite=False), given, settings,
                     info_of)


def _resolved(cfg: Config, given: Collection[str], settings: dict[str, Any],
              info_of: InfoOf | None = None) -> Config:
    from jaxsft import data, recipes

    info = (info_of or data.dataset_info)(cfg.data)
    return recipes.resolve(cfg, info, {*given, *settings})[0]


def _check_trials(base: Config, grid: Grid) -> None:
    """Every combination is a valid config (e.g. --recipe linear-probe needs --weights)."""
    for settings in trials(grid):
        try:
            base.replace(**settings)
        except ConfigError as e:
            raise ConfigError(f"--grid trial {trial_name(settings)}: {e}") from None


def _check_plans(configs: Sequence[Config], info_of: InfoOf) -> None:
    """What only the data and devices can tell (batch sizes, models, lengths), for every
    trial before the first trains."""
    from jaxsft import trainer
    from jaxsft.data import DataError

    for cfg in configs:
        try:
            trainer.make_plan(cfg, info_of(cfg.data))
        except (ConfigError, DataError) as e:
            raise type(e)(f"trial {Path(cfg.run.workdir).name}: {e}") from None


# ---------------------------------------------------------------------------- the record


def _definition(base: Config, grid: Grid, holdout: float) -> dict[str, Any]:
    """What makes a sweep this sweep: a rerun must match it."""
    return {"base": json.loads(base.to_json()), "grid": _jsonable(grid), "holdout": holdout}


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _load(root: Path) -> dict[str, Any] | None:
    """The sweep recorded in `root` (None for a new one); a training run's workdir, or a
    file that is not a sweep record, is refused."""
    path = root / SWEEP_FILE
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
            config.from_dict(saved["base"])
            return saved
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{path} is not a jaxsft sweep record ({e}); pass a new "
                              "--workdir") from None
    if (root / workdir_lib.CONFIG_FILE).exists() or (root / workdir_lib.CHECKPOINT_DIR).exists():
        raise ConfigError(f"{root} is a training run's workdir, not a sweep's; pass a new "
                          "--workdir")
    return None


def _check_same(root: Path, saved: dict[str, Any], base: Config, grid: Grid,
                holdout: float, splits: tuple[str, str]) -> None:
    """A rerun must be the same sweep: same base config (the fields the grid sets and those
    that only watch or save a run aside), grid (and order), holdout and so splits."""
    old = config.from_dict(saved["base"])
    varied = set(grid) | set(saved["grid"])
    changes = [f"{k} {a!r} -> {b!r}" for k, (a, b) in
               sorted(workdir_lib.config_diff(old, base).items()) if k not in varied]
    if list(saved["grid"].items()) != list(_jsonable(grid).items()):
        changes.append(f"grid {_grid_text(saved['grid'])} -> {_grid_text(grid)}")
    if saved["holdout"] != holdout:
        changes.append(f"holdout {saved['holdout']} -> {holdout}")
    elif [saved["fit_split"], saved["val_split"]] != list(splits):
        changes.append(f"held-out split {saved['val_split']} -> {splits[1]}: the data set "
                       "changed")
    if changes:
        raise ConfigError(f"{root} holds another sweep ({'; '.join(changes)}); pass a new "
                          "--workdir (nothing there is changed)")


def _grid_text(grid: dict[str, Sequence[Any]]) -> str:
    return " ".join(f"{k}={','.join(value_text(v) for v in vs)}" for k, vs in grid.items())


def _new_record(base: Config, grid: Grid, holdout: float, splits: tuple[str, str],
                info) -> dict[str, Any]:
    records = [{"index": i, "name": trial_name(s), "settings": _jsonable(s),
                "workdir": f"{TRIALS_DIR}/{trial_name(s)}", "status": "pending", "rank": None}
               for i, s in enumerate(trials(grid))]
    return {"version": 1, "protocol": PROTOCOL, **_definition(base, grid, holdout),
            "dataset": base.data.dataset, "model": base.model.model,
            "train_split": base.data.train_split, "fit_split": splits[0],
            "val_split": splits[1], "fit_examples": info.train_examples,
            "val_examples": info.eval_examples, "num_classes": info.num_classes,
            "trials": records, "best": None, "retrain": None}


def rank(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Finished trials by validation top-1 (then loss, then grid order), numbered; failed
    ones after them, then pending ones, unnumbered, in grid order."""
    done = sorted((r for r in records if r["status"] == "ok"),
                  key=lambda r: (-r["val_top1"], r["val_loss"], r["index"]))
    for i, r in enumerate(done, 1):
        r["rank"] = i
    rest = sorted((r for r in records if r["status"] != "ok"),
                  key=lambda r: (r["status"] != "failed", r["index"]))
    for r in rest:
        r["rank"] = None
    return done + rest


def _rank_record(record: dict[str, Any]) -> None:
    record["trials"] = rank(record["trials"])
    record["best"] = next((r["name"] for r in record["trials"] if r["rank"] == 1), None)


def _write(root: Path, record: dict[str, Any]) -> None:
    """sweep.json and sweep.md, each replaced atomically (a crash leaves old or new)."""
    for name, text in ((SWEEP_FILE, json.dumps(record, indent=2)),
                       (TABLE_FILE, format_table(record))):
        tmp = root / f".{name}.tmp"
        try:
            tmp.write_text(text + "\n")
            tmp.replace(root / name)
        except OSError as e:
            raise workdir_lib.unwritable(root, e) from None


# ---------------------------------------------------------------------------- the table


def _percent(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.2f}%"


def format_table(record: dict[str, Any]) -> str:
    """The ranked table (markdown), headed by what it ranks on, and the retrained run."""
    fields, top5 = list(record["grid"]), record["num_classes"] > 5
    head = ["rank", *fields, "val top-1", *(["val top-5"] if top5 else []), "val loss",
            "steps", "time", "status"]
    lines = [f"# Sweep: {record['model']} on {record['dataset']}", "",
             f"{len(record['trials'])} trials ranked by the final top-1 on `{record['val_split']}`"
             f" ({record['val_examples']} examples held out of `{record['train_split']}`, "
             f"trained on the other {record['fit_examples']}); the eval split was not used to "
             "choose.", "", "| " + " | ".join(head) + " |",
             "|" + "|".join(" --- " if h in (*fields, "status") else " ---: " for h in head)
             + "|"]
    for r in record["trials"]:
        cells = [str(r["rank"] or "-"), *(value_text(_tuple(r["settings"][f])) for f in fields),
                 _percent(r.get("val_top1")), *([_percent(r.get("val_top5"))] if top5 else []),
                 "" if r.get("val_loss") is None else f"{r['val_loss']:.4f}",
                 str(r.get("steps", "")), _duration(r.get("wall_s")), _status(r)]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    if record.get("retrain"):
        lines += ["", retrain_line(record)]
    return "\n".join(lines)


def _tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _duration(seconds: float | None) -> str:
    from jaxsft.metrics import format_duration

    return "" if seconds is None else format_duration(seconds)


def _status(r: dict[str, Any]) -> str:
    return f"failed: {r['error']}" if r["status"] == "failed" else r["status"]


def retrain_line(record: dict[str, Any]) -> str:
    """One line: the best settings retrained on the whole training split, and their score."""
    r = record["retrain"]
    where = f"`{record['train_split']}` in {r['workdir']}/"
    if r["status"] != "ok":
        return f"Retrained {r['name']} on {where}: failed: {r['error']}"
    if r.get("eval_top1") is None:
        return f"Retrained {r['name']} on {where}: no eval split to test it on"
    return (f"Retrained {r['name']} on {where}: top-1 {_percent(r['eval_top1'])} on "
            f"`{r['eval_split']}` ({r['eval_examples']} examples, loss {r['eval_loss']:.4f}).")


# ---------------------------------------------------------------------------- running


def run_trial(cfg: Config) -> dict[str, Any]:
    """Trains (or resumes) one run and reads its final evaluation: the record's result
    fields (wall_s: this call's seconds); a diverged run is `failed`, with the first clause
    of the error."""
    from jaxsft import trainer

    started = time.perf_counter()
    try:
        state = trainer.fit(cfg)
    except trainer.TrainingError as e:
        return {"status": "failed", "error": str(e).split(";")[0],
                "wall_s": round(time.perf_counter() - started, 1)}
    result: dict[str, Any] = {"status": "ok", "steps": int(state.step),
                              "wall_s": round(time.perf_counter() - started, 1)}
    final = last_eval(Path(cfg.run.workdir))
    if final is not None:
        result.update(top1=final["top1"], top5=final["top5"], loss=final["loss"],
                      examples=int(final["count"]))
    return result


def _prefixed(result: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The evaluation's fields named for the split they score (val_top1, eval_top1)."""
    scores = ("top1", "top5", "loss", "examples")
    return {(prefix + k if k in scores else k): v for k, v in result.items()}


def last_eval(workdir: Path) -> dict[str, Any] | None:
    """The run's last evaluation row (its final weights' score), None if it has none."""
    from jaxsft import metrics

    return next(reversed(metrics.eval_rows(workdir)), None)


def _run_trials(root: Path, record: dict[str, Any], configs: dict[str, Config],
                write: Callable[[], None], say: Callable[[str], None]) -> None:
    """Trains every trial not yet recorded, in grid order, recording each as it ends."""
    from jaxsft.compilation_cache import release_compiled

    todo = sorted(record["trials"], key=lambda r: r["index"])
    for r in todo:
        label = f"trial {r['index'] + 1}/{len(todo)} {r['name']}"
        if r["status"] != "pending":
            say(f"{label}: recorded ({_summary(r)}); skipped")
            continue
        say(f"{label}: training in {root / r['workdir']}")
        r.update(_prefixed(run_trial(configs[r["name"]]), "val_"))
        release_compiled()  # else ~90 trials reach the kernel's memory-map limit
        write()
        say(f"{label}: {_summary(r)}")


def _summary(r: dict[str, Any]) -> str:
    if r["status"] != "ok":
        return _status(r)
    return (f"val top-1 {_percent(r['val_top1'])}, loss {r['val_loss']:.4f}, {r['steps']} "
            f"steps in {_duration(r['wall_s'])}")


def _retrain(root: Path, base: Config, record: dict[str, Any], settings: dict[str, dict],
             write: Callable[[], None], say: Callable[[str], None],
             given: Collection[str], info_of: InfoOf) -> None:
    """Trains the best settings on the whole training split in <workdir>/best and records
    its score on the eval split (once: a recorded retrain is not run again)."""
    best = record["best"]
    if best is None:
        say("no trial finished: nothing to retrain")
        return
    if record.get("retrain") and record["retrain"]["name"] == best:
        say(f"retrain of {best}: recorded; skipped")
        return
    cfg = _resolved(base.replace(**settings[best], workdir=str(root / BEST_DIR),
                                 overwrite=False), given, settings[best], info_of)
    say(f"retraining {best} on {base.data.train_split} in {root / BEST_DIR}")
    result = _prefixed(run_trial(cfg), "eval_")
    split = info_of(cfg.data).eval_split
    record["retrain"] = {"name": best, "settings": _jsonable(settings[best]),
                         "workdir": BEST_DIR, "train_split": base.data.train_split,
                         "eval_split": split, **result}
    write()


def sweep(base: Config, grid: Grid, *, holdout: float = DEFAULT_HOLDOUT,
          retrain: bool = False, say: Callable[[str], None] = print,
          given: Collection[str] = ()) -> dict[str, Any]:
    """Runs (or resumes) the sweep in `base.run.workdir`; returns its record (sweep.json).
    `given`: fields the user set at their default values, which --recipe auto keeps.

    The workdir is locked (process 0) while the sweep runs; each trial's run locks its own.
    """
    import jax

    from jaxsft import data

    _check_trials(base, grid)
    splits = data.holdout_splits(base.data, holdout)
    root = Path(base.run.workdir)
    settings = {trial_name(s): s for s in trials(grid)}
    info_of = functools.cache(data.dataset_info)  # trials share their data: read it once
    configs = {name: trial_config(base, s, root / TRIALS_DIR / name, splits, given, info_of)
               for name, s in settings.items()}
    _check_plans(list(configs.values()), info_of)
    info = info_of(next(iter(configs.values())).data)
    is_main = jax.process_index() == 0
    say = say if is_main else (lambda _: None)
    with workdir_lib.lock(root) if is_main else contextlib.nullcontext():
        saved = _load(root)
        if saved is not None:
            _check_same(root, saved, base, grid, holdout, splits)
        record = saved or _new_record(base, grid, holdout, splits, info)

        def write() -> None:  # every process ranks alike; process 0 writes
            _rank_record(record)
            if is_main:
                _write(root, record)

        write()
        _run_trials(root, record, configs, write, say)
        if retrain:
            _retrain(root, base, record, settings, write, say, given, info_of)
    return record


# ---------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    """jaxsft.train's parser (every config flag sets the base config), plus the sweep's."""
    parser = train.build_parser()
    parser.prog = PROG
    parser.description = (
        "Train a small grid of settings, each on the training split less a held-out "
        "validation split, and rank them by validation top-1 (Kornblith et al. 2019); the "
        "eval split is never used to choose. Writes <workdir>/sweep.json and sweep.md; "
        "rerunning the same command resumes.")
    group = parser.add_argument_group("sweep")
    group.add_argument("--grid", action="append", required=True, metavar="FIELD=V1,V2,...",
                       help="values of one setting (any jaxsft.train flag, e.g. lr=0.003,0.01 "
                       "or recipe=full,linear-probe); repeat for more: the trials are the "
                       "product")
    group.add_argument("--holdout", type=float, default=DEFAULT_HOLDOUT, metavar="FRACTION",
                       help="fraction of --train-split held out as the validation split that "
                       "ranks the trials; the same examples for every trial and rerun "
                       f"(default: {DEFAULT_HOLDOUT})")
    group.add_argument("--retrain", action="store_true",
                       help="then train the best settings on the whole --train-split in "
                       "<workdir>/best and evaluate them on the eval split")
    return parser


SWEEP_FLAGS = ("grid", "holdout", "retrain")


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    launch = {k: getattr(args, k) for k in train.LAUNCH_FLAGS}
    own = {k: getattr(args, k) for k in SWEEP_FLAGS}
    for k in (*train.LAUNCH_FLAGS, *SWEEP_FLAGS):
        delattr(args, k)
    if getattr(args, "overwrite", False):
        raise ConfigError("--overwrite does not apply to a sweep (nothing of one is moved "
                          "aside): pass a new --workdir")
    given = train.given_fields(args)
    base = train.default_recipe(config.from_args(args), given)
    grid = parse_grid(own["grid"], base)
    if not 0 < own["holdout"] < 1:
        raise ConfigError(f"--holdout must be in (0, 1), e.g. 0.2, got {own['holdout']}")
    from jaxsft import distributed

    distributed.initialize(launch["coordinator_address"], launch["num_processes"],
                           launch["process_id"], timeout_s=launch["distributed_timeout"])
    for dtype in {base.model.dtype, *grid.get("dtype", ())}:
        cli.use_dtype(dtype)
    record = sweep(base, grid, holdout=own["holdout"], retrain=own["retrain"], given=given)
    _report(record, own["retrain"])


def _report(record: dict[str, Any], retrain: bool) -> None:
    """Prints the ranked table; a sweep without a finished trial (or a failed retrain) is a
    failed training (exit status 1)."""
    import jax

    from jaxsft.trainer import TrainingError

    if jax.process_index() == 0:
        print("\n" + format_table(record), flush=True)
    if record["best"] is None:
        raise TrainingError("no trial finished (every one failed): lower the --grid lr values "
                            "or add --clip-grad-norm or --warmup-epochs, with a new --workdir")
    if retrain and record["retrain"]["status"] != "ok":
        raise TrainingError(f"the retrained best settings failed: {record['retrain']['error']}")


if __name__ == "__main__":
    cli.run(main, prog=PROG)
