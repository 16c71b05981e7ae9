"""The issue's test of `--recipe auto` as it is now, on digits and LFW, over every fresh seed
whose cell ran auto's current settings: one record per target gathered from the protocols'
results, written as the report's tables (`results/<table>_resnet18_current-auto.*`).

Auto's rule changed between protocols only where it changes a cell's settings; a cell counts
here where the arm that ran is, setting for setting, what auto resolves to now (the fitted
imprint scale; `shift` from 25 epochs: digits at 1-2 labels per class, LFW at 5-10; the eval
view above),
on seeds that were fresh when that arm's settings were fixed. Every protocol ran the seed's
loop (and most ran scratch) on the same seeds: the baselines come from the same files.

    python -m experiments.transfer.current_auto
"""

from __future__ import annotations

import json
from pathlib import Path

from experiments.transfer import report

RESULTS = Path(__file__).parent / "results"
# Per table, (results file, the arm that ran auto's current settings there, at these labels
# per class; None: all).
SOURCES = {
    "digits": (
        # protocol 4, seeds 9-11: auto with the fitted scale on the eval view
        ("digits_resnet18_auto-length_seeds91011.json", "auto", (5, 10, 25, None)),
        # protocols 5 and 5b, seeds 12-17: shifted at 1-2 labels (64 and 32 epochs: the same
        # under the 10-epoch rule they tested), the eval view at 5-10 (auto-noaug)
        ("digits_resnet18_auto-length_seeds121314_b12510.json", "auto", (1, 2)),
        ("digits_resnet18_auto-length_seeds121314_b12510.json", "auto-noaug", (5, 10)),
        ("digits_resnet18_auto-length_seeds151617_b12510.json", "auto", (1, 2)),
        ("digits_resnet18_auto-length_seeds151617_b12510.json", "auto-noaug", (5, 10)),
        # protocol 6, seeds 18-20: the 25-epoch rule itself, where it shifts
        ("digits_resnet18_auto-length_seeds181920_b12.json", "auto", (1, 2)),
    ),
    "lfw": (
        # protocols 5, 5b and 6, seeds 9-17: shifted at 5 and 10 labels (80 and 40 epochs)
        ("lfw_resnet18_auto-length_seeds91011.json", "auto", (5, 10)),
        ("lfw_resnet18_auto-length_seeds121314_b51025.json", "auto", (5, 10)),
        ("lfw_resnet18_auto-length_seeds151617_b510.json", "auto", (5, 10)),
        # the eval view at 25 (12.8 epochs) and all labels: auto-noaug, seeds 9-14 and 9-11
        ("lfw_resnet18_auto-length_seeds91011.json", "auto-noaug", (25, None)),
        ("lfw_resnet18_auto-length_seeds121314_b51025.json", "auto-noaug", (25,)),
    ),
}
BASELINES = ("seed", "scratch")


def gathered(table: str = "digits", results: Path = RESULTS) -> dict:
    """One record: arm "auto" from the table's SOURCES, the baselines from the same files,
    budgets and seeds; a (arm, budget, seed) cell that two files hold is taken once."""
    runs, seen = [], set()
    for name, arm, budgets in SOURCES[table]:
        record = json.loads((results / name).read_text())
        for row in record["runs"]:
            if row["budget"] not in budgets or row["arm"] not in (arm, *BASELINES):
                continue
            row = dict(row, arm="auto" if row["arm"] == arm else row["arm"])
            if (row["arm"], row["budget"], row["seed"]) not in seen:
                seen.add((row["arm"], row["budget"], row["seed"]))
                runs.append(row)
    return {"table": table, "model": "resnet18", "sources": [list(s) for s in SOURCES[table]],
            "arms": {"auto": {"recipe": "auto"}}, "runs": runs}


def main() -> None:
    for table in SOURCES:
        record = gathered(table)
        out = RESULTS / f"{table}_resnet18_current-auto.json"
        out.write_text(json.dumps(record, indent=1))
        report.write(record, out.with_suffix(""))
        print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
