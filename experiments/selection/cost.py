"""What `jaxsft.select` costs now, against the fine-tuning of protocol 2: LogME, LEEP and the
source accuracy of every zoo candidate on both targets, features extracted afresh (a new
feature cache; the compilation cache as `experiments.selection.run` leaves it).

    python -m experiments.selection.cost   # after experiments.selection.run

writes results/digits_cost.json: per target, the wall time and each candidate's seconds and
scores, and each score's share of fine-tuning every candidate once (digits.json's runs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
SCORES = ("logme", "leep", "source_acc")


def _finetune_once(record: dict, budget: str) -> float:
    """Fine-tuning every candidate once: the sum over candidates of the mean wall time of a
    run (the report's definition)."""
    walls: dict[str, list[float]] = {}
    for r in record["runs"]:
        if r["budget"] == budget:
            walls.setdefault(r["candidate"], []).append(r["wall_s"])
    return sum(sum(w) / len(w) for w in walls.values())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="runs/selection")
    p.add_argument("--results", default=str(RESULTS))
    args = p.parse_args(argv)
    os.environ["JAXSFT_ONEDNN"] = "off"  # as the study's own run
    from jaxsft.process import setup

    setup()
    from experiments.selection.run import SCORE_SEED
    from jaxsft import config, select

    record = json.loads((Path(args.results) / "digits.json").read_text())
    specs = [select.Candidate(c["arch"], c["weights"]) for c in record["zoo"]]
    out = {}
    for budget in record["budgets"]:
        data = Path(args.workdir) / "data" / f"digits_b{budget}_s{SCORE_SEED}"
        cfg = config.from_dict(dict(dataset=f"folder:{data}", image_size=32, augment="none",
                                    batch_size=100)).data
        cache = Path(args.workdir) / "cost" / budget
        shutil.rmtree(cache, ignore_errors=True)  # features computed afresh, not read
        started = time.perf_counter()
        result = select.select(specs, cfg, scores=SCORES, rank_by="logme", workdir=str(cache),
                               seed=SCORE_SEED)
        wall = time.perf_counter() - started
        rows = [{"spec": r["spec"], "seconds": r["seconds"], "scores": r["scores"]}
                for r in result["candidates"]]
        features = sum(r["seconds"]["features"] for r in rows)
        finetune = _finetune_once(record, budget)
        share = {s: (features + sum(r["seconds"].get(s, 0) for r in rows)) / finetune
                 for s in SCORES}
        out[budget] = {"wall_s": round(wall, 1), "features_s": round(features, 1),
                       "finetune_once_s": round(finetune, 1), "share_of_finetuning": share,
                       "rows": rows}
        print(f"{budget}: select {wall:.1f} s (features {features:.1f} s); fine-tuning every "
              f"candidate once {finetune:.1f} s; " + ", ".join(
                  f"{s} {100 * v:.1f}%" for s, v in share.items()), flush=True)
    path = Path(args.results) / "digits_cost.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
