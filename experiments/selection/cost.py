"""What `jaxsft.select` costs now, against the fine-tuning of protocol 2: LogME, LEEP and the
source accuracy of every zoo candidate on both targets, with features extracted afresh.

    python -m experiments.selection.cost          # after experiments.selection.run
    python -m experiments.selection.cost --cold   # an empty compilation cache as well
    python -m experiments.selection.cost --quick  # after experiments.selection.run --quick

writes results/digits_cost[_cold][_quick].json: per target, select's result (every candidate's
seconds and scores) and each score's seconds and share of fine-tuning every candidate once,
as the study's report computes them. Without --cold the compilation cache is the one the
study leaves (its fine-tuning runs load their compiled steps from it too).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
SCORES = ("logme", "leep", "source_acc")


def measure(workdir: Path, results: Path, cold: bool, quick: bool) -> Path:
    """Scores every target's training set afresh; writes and returns the JSON."""
    from jaxsft.process import setup

    setup()
    from experiments.selection import report
    from experiments.selection.run import SCORE_SEED, score_target

    suffix = "_quick" if quick else ""  # the study's --quick record and workdir
    record = json.loads((results / f"digits{suffix}.json").read_text())
    workdir = workdir / ("quick" if quick else "")
    out = {}
    for budget in record["budgets"]:
        data = workdir / "data" / f"digits_b{budget}_s{SCORE_SEED}"
        fresh = workdir / "cost" / budget
        shutil.rmtree(fresh, ignore_errors=True)  # features computed afresh, not read
        started = time.perf_counter()
        result = score_target(record["zoo"], data, fresh, scores=SCORES)
        wall = time.perf_counter() - started
        summary = report.summarise_target({**record, "scores": {budget: result}}, budget)
        costs = {s: {k: summary["scores"][s][k] for k in ("seconds", "cost_share")}
                 for s in SCORES}
        out[budget] = {"wall_s": round(wall, 1), "finetune_s": summary["finetune_s"],
                       "scores": costs, "select": result}
        print(f"{budget}: select {wall:.1f} s; fine-tuning every candidate once "
              f"{summary['finetune_s']['one_seed']:.1f} s; " + ", ".join(
                  f"{s} {v['seconds']:.1f} s = {100 * v['cost_share']:.1f}%"
                  for s, v in costs.items()), flush=True)
    path = results / f"digits_cost{'_cold' if cold else ''}{suffix}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="runs/selection")
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--cold", action="store_true",
                   help="compile everything afresh (a new, empty compilation cache)")
    p.add_argument("--quick", action="store_true", help="the study's --quick record")
    args = p.parse_args(argv)
    os.environ["JAXSFT_ONEDNN"] = "off"  # as the study's own run
    with tempfile.TemporaryDirectory(prefix="jaxsft-cold-") as empty:
        if args.cold:
            os.environ["JAXSFT_CACHE"] = empty  # compiled and downloaded things: none
        path = measure(Path(args.workdir), Path(args.results), args.cold, args.quick)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
