"""Does `python -m jaxsft.select` rank pretrained candidates the way fine-tuning does?

    python -m experiments.selection.run [--table digits|lfw|surfaces] [--quick]
    python -m experiments.selection.run [--table digits|lfw|surfaces] [--quick] --add-scores NAME...

pretrains and exports the zoo (zoo.py), scores every candidate with jaxsft.select on each
target's training images, fine-tunes every candidate on each target through `fit` (3 seeds),
and writes experiments/selection/results/<table>[_quick].{json,md}. Everything is cached in
--workdir and the JSON: a stopped run resumes where it was (--fresh starts over).
--add-scores computes only the named scores, from the features select cached in --workdir,
into the record's kept rows, and writes the report again: nothing else is recomputed.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from experiments.selection import report
from experiments.transfer.arms import ARMS
from jaxsft.select import SCORES

RESULTS = Path(__file__).parent / "results"
# The ground truth's fine-tuning (protocol 2): jaxsft's default for a weights file, --recipe
# auto, as long as auto chooses; the random candidate, which auto cannot start (it imprints
# the head from source features), gets the transfer benchmark's scratch arm for as long.
# Protocol 1 used the seed's loop, dict(lr=0.01), for all (results/digits_seed-loop.*).
# Auto as it was when protocol 2 ran: the imprinted head at the fixed scale 10 (the transfer
# benchmark's arm "auto-s10"; auto has fitted the scale since its protocol 4).
# LFW (protocol 3) is fine-tuned with auto as it was at protocol 4 ("auto-noaug": the scale
# fitted, the benchmark's augment none; auto has chosen its augmentation since protocol 5).
# Surfaces (protocol 5) is fine-tuned with auto as it is now ("auto").
FINETUNE = {table: {"pretrained": ARMS[arm], "random": ARMS["scratch"], "length": "auto"}
            for table, arm in (("digits", "auto-s10"), ("lfw", "auto-noaug"),
                               ("surfaces", "auto"))}
BUDGETS = (10, None)  # labels per class; None: all (digits 1,297 images, LFW 100, surfaces 300)
SEEDS = (0, 1, 2)
SCORE_SEED = 0  # the scores see one training set, as a user holds one: seed 0's subset
RANK_BY = "logme"  # the recommended score: jaxsft.select's default --rank-by
# small targets, seconds to score (LFW: batch 8 needs 8 training images)
# Protocol 5's calibration, before anything else: the random candidate's scratch run at 10
# labels per class with a seed no table uses; 95% or more would have meant smaller tiles.
CALIBRATION = dict(budget=10, seed=99)
QUICK = dict(budgets={"digits": (2, 10), "lfw": (5, 10), "surfaces": (2, 5)},
             seeds=(0,), steps=4)


def _label(budget: int | None) -> str:
    return "all" if budget is None else str(budget)


def _score_config(data: Path):
    """The DataConfig select scores a target's training split with."""
    from jaxsft import config

    return config.from_dict(dict(dataset=f"folder:{data}", image_size=32, augment="none",
                                 batch_size=100)).data


def score_target(zoo: list[dict], data: Path, workdir: Path,
                 scores: tuple[str, ...] | None = None) -> dict:
    """jaxsft.select on the target's training split: every candidate, every score (or
    `scores`), with the seconds each took (features cached in workdir/select, as --workdir
    caches them); each row named by its candidate."""
    from jaxsft import select

    cfg = _score_config(data)
    specs = [select.Candidate(c["arch"], c["weights"]) for c in zoo]
    result = select.select(specs, cfg, scores=scores or select.DEFAULT_SCORES,
                           rank_by=RANK_BY, workdir=str(workdir / "select"), seed=SCORE_SEED)
    print(select.format_table(result), flush=True)
    names = {s.spec: c["name"] for s, c in zip(specs, zoo)}
    for row in result["candidates"]:
        row["name"] = names[row["spec"]]
    return result


def finetune_candidate(table: str, candidate: dict, budget: int | None, seed: int,
                       workdir: Path, steps: int | None) -> dict:
    """One ground-truth run: auto from the candidate's file (random: the scratch arm)."""
    from experiments.transfer.run import finetune, target_data

    data = target_data(table, budget, seed, workdir)
    random = candidate["weights"] == "random"
    arm = FINETUNE[table]["random" if random else "pretrained"]
    run = workdir / "cells" / f"{candidate['name']}_{data.name}"
    row = finetune(candidate["arch"], arm, data, seed, run=run, steps=steps,
                   weights=None if random else Path(candidate["weights"]),
                   length=FINETUNE[table]["length"])
    return {"candidate": candidate["name"], "budget": _label(budget), **row}


def _load(out: Path, fresh: bool, finetune: dict) -> dict:
    """The record so far; runs of another FINETUNE recipe are dropped (a stale truth)."""
    record = {} if fresh or not out.exists() else json.loads(out.read_text())
    if record.get("finetune") != finetune:
        record["runs"] = []
    record.setdefault("scores", {})
    return record


def run_scores(record: dict, zoo: list[dict], budgets, workdir: Path, out: Path) -> None:
    """Every target's select result, kept in the record unless the zoo changed."""
    from experiments.transfer.run import target_data

    names = [c["name"] for c in zoo]
    for budget in budgets:
        kept = record["scores"].get(_label(budget))
        if kept and sorted(r["name"] for r in kept["candidates"]) == sorted(names):
            continue
        data = target_data(record["table"], budget, SCORE_SEED, workdir)
        record["scores"][_label(budget)] = score_target(zoo, data, workdir)
        report.save(record, out)


def run_truth(record: dict, zoo: list[dict], budgets, seeds, workdir: Path, out: Path,
              steps: int | None) -> None:
    """Every (seed, target, candidate) fine-tuning run not in the record yet, saved as it
    ends: seed 0 for every candidate first, so a stopped run has whole seeds."""
    from jaxsft.compilation_cache import release_compiled

    done = {(r["candidate"], r["budget"], r["seed"]) for r in record["runs"]}
    for seed in seeds:
        for budget in budgets:
            for candidate in zoo:
                if (candidate["name"], _label(budget), seed) in done:
                    continue
                row = finetune_candidate(record["table"], candidate, budget, seed, workdir,
                                         steps)
                release_compiled()
                print(f"RUN {json.dumps(row)}", flush=True)
                record["runs"].append(row)
                report.save(record, out)


def add_scores(out: Path, names: list[str], workdir: Path) -> dict:
    """Scores `names` of every candidate at every kept target from the features select
    cached in workdir/select, merged into the kept rows (value, seconds, error as select
    writes them; a score a row has already is left as it is); the record and its report
    written again. Kept scores, the zoo and the fine-tuning runs are not touched: a row whose
    features are not cached, or whose cached features do not give its kept LogME again,
    stops it before anything is written."""
    import numpy as np

    from experiments.transfer.run import target_dir
    from jaxsft import select
    from jaxsft import transferability as T

    if not out.exists():
        raise SystemExit(f"{out}: no record to add scores to (run the study first)")
    started = time.perf_counter()
    record = json.loads(out.read_text())
    cache = str(workdir / "select")
    todo = []  # (row, candidate, features, names): all checked before any score is added
    for label in record["budgets"]:
        kept = record["scores"].get(label)
        if not kept:
            raise SystemExit(f"{out}: no kept scores at {label} labels per class")
        # target_data's folder, not written again: the cache is keyed by its path
        budget = None if label == "all" else int(label)
        cfg = _score_config(target_dir(record["table"], budget, SCORE_SEED, workdir))
        for row in kept["candidates"]:
            missing = [n for n in names if n not in row["scores"]]
            if row["error"] or not missing:  # a failed candidate has no features
                continue
            candidate = select.Candidate(row["arch"], row["weights"])
            path = select.features_path(candidate, cfg, cache, seed=SCORE_SEED)
            if not path.is_file():
                raise SystemExit(f"{row['name']} at {label} labels per class: its features "
                                 f"are not cached ({path}); --add-scores extracts nothing")
            got = select.cached_features(candidate, cfg, cache, seed=SCORE_SEED)
            logme = row["scores"].get("logme")
            if (got.features.shape != (row["examples"], row["dim"])
                    or logme is not None and not np.isclose(
                        T.logme(got.features, got.labels), logme, rtol=1e-9, atol=0)):
                raise SystemExit(f"{row['name']} at {label} labels per class: the cached "
                                 f"features ({path}) are not those its kept scores came from")
            todo.append((row, candidate, got, missing))
    for row, candidate, got, missing in todo:
        select.add_scores(row, got, candidate, missing, seed=SCORE_SEED)
        print(f"{row['name']}: " + ", ".join(f"{n} {row['scores'][n]}" for n in missing),
              flush=True)
    record["wall_s"] = round(record.get("wall_s", 0.0) + time.perf_counter() - started, 1)
    report.write(record, out)
    return record


def _identity(zoo: list[dict]) -> list[tuple]:
    """What the kept scores were computed on: the candidates and their source top-1 (a
    rebuilt zoo with the same held-out accuracies is the same pretraining, redone)."""
    return [(c["name"], c["source_top1"]) for c in zoo]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--table", choices=sorted(FINETUNE), default="digits",
                   help="the target: digits, LFW's faces vs non-faces (protocol 3) or "
                   "scikit-image's texture photographs (protocol 5)")
    p.add_argument("--quick", action="store_true",
                   help="the pipeline in minutes: 3 candidates, 6 pretraining steps, 1 seed, "
                   "two small label budgets")
    p.add_argument("--workdir", default="runs/selection")
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--fresh", action="store_true", help="ignore scores and runs in the JSON")
    p.add_argument("--skip-truth", action="store_true",
                   help="zoo and scores only (the report then has no taus)")
    p.add_argument("--calibrate", action="store_true",
                   help="only the calibration run (protocol 5): the random candidate from "
                   "scratch at 10 labels per class, seed 99; prints its top-1")
    p.add_argument("--add-scores", nargs="+", metavar="NAME", choices=list(SCORES),
                   help="only these scores (of: %(choices)s), from the features cached in "
                   "--workdir, added to the record's kept rows; then the report again")
    args = p.parse_args(argv)
    workdir = Path(args.workdir) / ("quick" if args.quick else "")
    out = Path(args.results) / f"{args.table}{'_quick' if args.quick else ''}.json"
    if args.add_scores:  # numpy only: no JAX, no process settings
        if args.fresh:
            p.error("--add-scores adds to the kept record: not with --fresh")
        add_scores(out, args.add_scores, workdir)
        print(f"wrote {out}, {out.with_suffix('.md')}")
        return

    os.environ["JAXSFT_ONEDNN"] = "off"  # XLA's own kernels: storable in the compilation cache
    from jaxsft.process import setup

    cache = setup()
    from experiments.selection import zoo

    workdir.mkdir(parents=True, exist_ok=True)
    if args.calibrate:
        row = finetune_candidate(args.table, zoo.RANDOM_CANDIDATE, CALIBRATION["budget"],
                                 CALIBRATION["seed"], workdir, None)
        print(f"CALIBRATION {json.dumps(row)}")
        return
    budgets, seeds, steps = ((QUICK["budgets"][args.table], QUICK["seeds"], QUICK["steps"])
                             if args.quick
                             else (BUDGETS, SEEDS, None))
    started = time.perf_counter()
    record = _load(out, args.fresh, FINETUNE[args.table])
    candidates = zoo.candidates(workdir, quick=args.quick)
    if _identity(record.get("zoo", [])) != _identity(candidates):
        record["scores"] = {}  # a rebuilt zoo that differs: its scores are computed anew
    record.update(table=args.table, quick=args.quick, finetune=FINETUNE[args.table],
                  rank_by=RANK_BY,
                  budgets=[_label(b) for b in budgets], seeds=list(seeds),
                  score_seed=SCORE_SEED, compilation_cache=str(cache), onednn="off",
                  zoo=candidates)
    report.save(record, out)
    run_scores(record, candidates, budgets, workdir, out)
    if not args.skip_truth:
        run_truth(record, candidates, budgets, seeds, workdir, out, steps)
    record["wall_s"] = round(record.get("wall_s", 0.0) + time.perf_counter() - started, 1)
    print(report.write(record, out))
    print(f"wrote {out}, {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
