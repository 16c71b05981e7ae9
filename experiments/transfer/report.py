"""The table (mean ± std over seeds, best arm per budget in bold) and the label-efficiency
plot of one results JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def cells(record: dict) -> dict[tuple[str, object], list[float]]:
    out: dict[tuple[str, object], list[float]] = {}
    for r in record["runs"]:
        out.setdefault((r["arm"], r["budget"]), []).append(100 * r["top1"])
    return out


def _label(budget) -> str:
    return "all" if budget is None else str(budget)


def budgets_of(record: dict) -> list:
    """The record's label budgets, smallest first; None (all labels) last."""
    return sorted({r["budget"] for r in record["runs"]},
                  key=lambda b: float("inf") if b is None else b)


def markdown(record: dict) -> str:
    c = cells(record)
    arms = list(dict.fromkeys(r["arm"] for r in record["runs"]))
    budgets = budgets_of(record)
    best = {b: max((np.mean(c[a, b]) for a in arms if (a, b) in c), default=None)
            for b in budgets}
    diverged: dict = {}
    for r in record["runs"]:
        if r.get("diverged"):
            diverged[r["arm"], r["budget"]] = diverged.get((r["arm"], r["budget"]), 0) + 1
    lines = ["| arm \\ labels per class | " + " | ".join(_label(b) for b in budgets) + " |",
             "| --- |" + " ---: |" * len(budgets)]
    for a in arms:
        row = []
        for b in budgets:
            v = c.get((a, b))
            if not v:
                row.append("")
                continue
            text = f"{np.mean(v):.1f} ± {np.std(v, ddof=1) if len(v) > 1 else 0:.1f}"
            if diverged.get((a, b)):
                text += " †" * diverged[a, b]
            row.append(f"**{text}**" if np.mean(v) == best[b] else text)
        lines.append(f"| {a} | " + " | ".join(row) + " |")
    seeds = sorted({r["seed"] for r in record["runs"]})
    per_arm = {a: len({r["seed"] for r in record["runs"] if r["arm"] == a}) for a in arms}
    counts = "" if len(set(per_arm.values())) == 1 else " (seeds per arm: " + ", ".join(
        f"{a} {n}" for a, n in per_arm.items()) + ")"
    lines.append(f"\nTop-1 (%) on the fixed test set of {record['runs'][0]['test_count']} "
                 f"images, mean ± sample std over seeds {seeds}{counts}; bold: the best mean "
                 "per budget. †: a seed whose loss became non-finite (the run failed), counted "
                 "at chance.")
    return "\n".join(lines)


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = cells(record)
    arms = list(dict.fromkeys(r["arm"] for r in record["runs"]))
    budgets = budgets_of(record)
    xs = {b: (max(x for x in budgets if x is not None) * 4 if b is None else b)
          for b in budgets} if any(b is not None for b in budgets) else {None: 1}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for a in arms:
        bs = [b for b in budgets if (a, b) in c]
        ax.errorbar([xs[b] for b in bs], [np.mean(c[a, b]) for b in bs],
                    yerr=[np.std(c[a, b], ddof=1) if len(c[a, b]) > 1 else 0 for b in bs],
                    label=a, marker="o", capsize=3,
                    linewidth=2.5 if a in ("scratch", "seed", "bit", "auto") else 1.2)
    ax.set_xscale("log")
    ax.set_xticks([xs[b] for b in budgets], [_label(b) for b in budgets])
    ax.set_xlabel("labels per class")
    ax.set_ylabel("top-1 on the fixed test set (%)")
    ax.set_title(f"{record['table']}, {record['model']}: fine-tuned from printed characters")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def difference(record: dict, a: str, b: str, budget) -> tuple[float, float, float]:
    """(arm a's mean top-1 minus arm b's at a budget, its standard error, the paired one: the
    same seed draws the same labelled subset for every arm, so per-seed differences cancel
    its luck)."""
    c = cells(record)
    x, y = c[a, budget], c[b, budget]
    se = np.sqrt(np.var(x, ddof=1) / len(x) + np.var(y, ddof=1) / len(y)) \
        if min(len(x), len(y)) > 1 else float("nan")
    by_seed = {(r["arm"], r["budget"], r["seed"]): 100 * r["top1"] for r in record["runs"]}
    seeds = sorted({s for (arm, bud, s) in by_seed if arm == a and bud == budget}
                   & {s for (arm, bud, s) in by_seed if arm == b and bud == budget})
    diffs = [by_seed[a, budget, s] - by_seed[b, budget, s] for s in seeds]
    paired = np.std(diffs, ddof=1) / np.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    return float(np.mean(x) - np.mean(y)), se, paired


def paired_table(record: dict, candidate: str = "auto") -> str:
    """The candidate against every other arm, per budget: the difference of means and that
    difference in paired standard errors."""
    c = cells(record)
    budgets = budgets_of(record)
    others = [a for a in dict.fromkeys(r["arm"] for r in record["runs"]) if a != candidate]
    lines = ["| labels per class | " + " | ".join(f"{candidate} - {a}" for a in others) + " |",
             "| --- |" + " ---: |" * len(others)]
    for b in budgets:
        row = [_label(b)]
        for a in others:
            if (candidate, b) not in c or (a, b) not in c:
                row.append("")
                continue
            d, _, paired = difference(record, candidate, a, b)
            row.append(f"{d:+.1f} (this difference on every seed)" if paired == 0 else
                       f"{d:+.1f} ({d / paired:+.1f} paired se)")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def auto_check(record: dict, candidate: str = "bit") -> str:
    """The protocol's test of a candidate `auto` arm, per budget: its lead over scratch and
    the seed's recipe in units of the standard error of the difference of means (> 2 wanted at
    <= 10 labels per class), and its gap to the best arm in the same unit (<= 1 wanted)."""
    c = cells(record)
    budgets = budgets_of(record)
    arms = list(dict.fromkeys(r["arm"] for r in record["runs"]))

    lines = [f"| labels per class | {candidate} - scratch | {candidate} - seed | best arm | "
             f"best - {candidate} |", "| --- | ---: | ---: | --- | ---: |"]
    for b in budgets:
        if (candidate, b) not in c:
            continue
        row = [_label(b)]
        for other in ("scratch", "seed"):
            if (other, b) in c:
                d, se, paired = difference(record, candidate, other, b)
                row.append(f"{d:+.1f} ({d / se:+.1f} se, {d / paired:+.1f} paired)")
            else:
                row.append("")
        best = max((a for a in arms if (a, b) in c), key=lambda a: np.mean(c[a, b]))
        d, se, paired = (difference(record, best, candidate, b) if best != candidate
                         else (0.0, 1.0, 1.0))
        row += [best, f"{d:.1f} ({d / se:.1f} se, {d / paired:.1f} paired)"]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("\nse: the standard error of the difference of the two means over seeds; "
                 "paired: that of the mean per-seed difference (a seed draws the same "
                 "labelled subset for every arm).")
    return "\n".join(lines)


def write(record: dict, stem: Path) -> None:
    text = markdown(record)
    for candidate in ("auto", "bit"):
        if any(r["arm"] == candidate for r in record["runs"]):
            text += f"\n\nThe candidate `auto` ({candidate}) against the protocol's test:" \
                f"\n\n" + auto_check(record, candidate)
            text += f"\n\n{candidate} against every arm:\n\n" + paired_table(record, candidate)
            break
    stem.with_suffix(".md").write_text(text + "\n")
    plot(record, stem.with_suffix(".png"))


def merged(paths: list[Path]) -> dict:
    """One record from several JSONs of the same table (processes that ran other seeds)."""
    records = [json.loads(p.read_text()) for p in paths]
    out = dict(records[0], runs=[])
    seen = set()
    for r in records:
        for row in r["runs"]:
            if (row["arm"], row["budget"], row["seed"]) not in seen:
                seen.add((row["arm"], row["budget"], row["seed"]))
                out["runs"].append(row)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="The table and plot of one or more results "
                                "JSONs of the same table (several processes' seeds, merged).")
    p.add_argument("paths", nargs="+", type=Path)
    p.add_argument("--out", type=Path, help="write the merged JSON (and .md/.png) here "
                   "(default: over the first path, when there are several)")
    p.add_argument("--arms", help="keep only these arms, e.g. auto,seed")
    p.add_argument("--budgets", help="keep only these labels per class, e.g. 5,10,all")
    args = p.parse_args(argv)
    if (args.arms or args.budgets) and (
            not args.out or args.out.resolve() in {path.resolve() for path in args.paths}):
        p.error("--arms/--budgets drop runs: give an --out that is not an input JSON")
    record = merged(args.paths)
    if args.arms:
        record["arms"] = {a: record["arms"][a] for a in args.arms.split(",")}
        record["runs"] = [r for r in record["runs"] if r["arm"] in record["arms"]]
    if args.budgets:
        keep = {None if b == "all" else int(b) for b in args.budgets.split(",")}
        record["runs"] = [r for r in record["runs"] if r["budget"] in keep]
    out = args.out or args.paths[0]
    if args.out or len(args.paths) > 1:  # one JSON alone is only reported again
        out.write_text(json.dumps(record, indent=1))
    write(record, out.with_suffix(""))


if __name__ == "__main__":
    main()
