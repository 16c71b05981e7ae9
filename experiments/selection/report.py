"""The selection study's numbers from its record: ground truth per candidate, the weighted
Kendall tau of every score against it, what each score's pick loses, and what each costs
next to fine-tuning every candidate."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

BASELINE = "source_top1"  # rank by the held-out source top-1 that pretraining recorded
TAU_GOAL, COST_GOAL = 0.7, 0.05


def weighted_tau(values: list[float | None], truth: list[float]) -> float | None:
    """scipy's weighted Kendall tau (hyperbolic weights, ranks from both orders averaged:
    its defaults). A candidate without a value ranks last, as jaxsft.select ranks it."""
    from scipy.stats import weightedtau

    x = np.array([np.nan if v is None else v for v in values], np.float64)
    if np.isfinite(x).sum() < 2 or len(set(truth)) < 2:
        return None
    x[~np.isfinite(x)] = np.nanmin(x) - 1.0
    tau = float(weightedtau(x, np.asarray(truth, np.float64))[0])
    return tau if np.isfinite(tau) else None


def truth_of(record: dict, budget: str) -> dict[str, dict]:
    """Per candidate: mean and sample std of top-1 (%) over seeds, and the mean seconds of
    one fine-tuning run."""
    out: dict[str, dict] = {}
    for name in [c["name"] for c in record["zoo"]]:
        runs = [r for r in record["runs"] if r["candidate"] == name and r["budget"] == budget]
        if runs:
            top1 = [100 * r["top1"] for r in runs]
            out[name] = {"mean": float(np.mean(top1)), "n": len(runs),
                         "std": float(np.std(top1, ddof=1)) if len(runs) > 1 else 0.0,
                         "wall_s": float(np.mean([r["wall_s"] for r in runs])),
                         "diverged": sum(1 for r in runs if r.get("diverged"))}
    return out


def seed_agreement(record: dict, budget: str) -> list[float | None]:
    """Per seed, τ_w of that seed's top-1 against the mean of the other seeds': how well
    the ground truth agrees with itself, the most a score can be expected to reach."""
    names = [c["name"] for c in record["zoo"]]
    top1 = {(r["candidate"], r["seed"]): 100 * r["top1"] for r in record["runs"]
            if r["budget"] == budget}
    seeds = sorted({s for _, s in top1})
    out = []
    for seed in seeds:
        have = [n for n in names if all((n, s) in top1 for s in seeds)]
        others = [np.mean([top1[n, s] for s in seeds if s != seed]) for n in have]
        out.append(weighted_tau([top1[n, seed] for n in have], others)
                   if len(seeds) > 1 else None)
    return out


def _values(record: dict, budget: str) -> tuple[dict[str, dict], dict[str, float]]:
    """({score: {candidate: value}} incl. the baseline, {score: total seconds})."""
    rows = record["scores"][budget]["candidates"]
    names = list(dict.fromkeys(n for r in rows for n in r["scores"]))
    values = {n: {r["name"]: r["scores"].get(n) for r in rows} for n in names}
    features = sum(r["seconds"].get("features", 0.0) for r in rows)
    seconds = {n: features + sum(r["seconds"].get(n, 0.0) for r in rows) for n in names}
    values[BASELINE] = {c["name"]: c["source_top1"] for c in record["zoo"]}
    seconds[BASELINE] = 0.0  # read from pretraining's own evaluation: no extra work
    return values, seconds


def summarise_target(record: dict, budget: str) -> dict:
    """Taus, picks, regrets and costs of every score at one target."""
    truth = truth_of(record, budget)
    values, seconds = _values(record, budget)
    names = list(truth)
    finetune_one = sum(t["wall_s"] for t in truth.values())
    finetune_all = sum(r["wall_s"] for r in record["runs"] if r["budget"] == budget)
    best = max(names, key=lambda n: truth[n]["mean"]) if names else None
    out = {"candidates": len(names), "truth": truth, "best": best, "scores": {},
           "seed_agreement": seed_agreement(record, budget),
           "finetune_s": {"one_seed": round(finetune_one, 1), "all_seeds": round(finetune_all, 1)}}
    for score, by_name in values.items():
        have = [n for n in names if by_name.get(n) is not None]
        pick = max(have, key=lambda n: by_name[n]) if have else None
        out["scores"][score] = {
            "tau_w": weighted_tau([by_name.get(n) for n in names],
                                  [truth[n]["mean"] for n in names]) if names else None,
            "pick": pick,
            "regret": None if pick is None else truth[best]["mean"] - truth[pick]["mean"],
            "seconds": round(seconds[score], 2),
            "cost_share": seconds[score] / finetune_one if finetune_one else None}
    return out


def _tau_ok(tau: float | None) -> bool:
    return tau is not None and tau >= TAU_GOAL


def _beats(tau: float | None, baseline: float | None) -> bool:
    """Above the baseline's τ_w (a baseline without one is beaten by any value)."""
    return tau is not None and (baseline is None or tau > baseline)


def summarise(record: dict) -> dict:
    """Every target's summary and the goal's verdict for the recommended score."""
    targets = {b: summarise_target(record, b) for b in record["budgets"]
               if b in record["scores"]}
    goal = {}
    for budget, t in targets.items():
        s, base = t["scores"].get(record["rank_by"], {}), t["scores"][BASELINE]
        tau, share = s.get("tau_w"), s.get("cost_share")
        goal[budget] = {"tau_w": tau, "baseline_tau_w": base["tau_w"],
                        "tau_ok": _tau_ok(tau), "beats_baseline": _beats(tau, base["tau_w"]),
                        "cost_ok": share is not None and share < COST_GOAL}
    met = bool(goal) and all(g["tau_ok"] and g["beats_baseline"] and g["cost_ok"]
                             for g in goal.values())
    return {"targets": targets, "goal": {"score": record["rank_by"], "by_target": goal,
                                         "met": met}}


def _num(value, fmt: str = "{:.3f}") -> str:
    return "n/a" if value is None else fmt.format(value)


def zoo_table(record: dict, summary: dict) -> list[str]:
    budgets = list(summary["targets"])
    lines = ["| candidate | source | steps | source top-1 | pretraining run (s) | "
             + " | ".join(f"top-1, {b} labels per class" for b in budgets) + " |",
             "| --- | --- | ---: | ---: | ---: |" + " ---: |" * len(budgets)]
    for c in record["zoo"]:
        cells = []
        for b in budgets:
            t = summary["targets"][b]["truth"].get(c["name"])
            text = "" if t is None else f"{t['mean']:.1f} ± {t['std']:.1f}"
            if t and t["diverged"]:
                text += " †" * t["diverged"]
            cells.append(f"**{text}**" if summary["targets"][b]["best"] == c["name"] else text)
        top1 = _num(c["source_top1"] and 100 * c["source_top1"], "{:.1f}")
        lines.append(f"| {c['name']} | {c['source'] or '-'} | {c['steps']} | {top1} | "
                     f"{c['pretrain_s']:.0f} | " + " | ".join(cells) + " |")
    return lines


def tau_table(summary: dict) -> list[str]:
    budgets = list(summary["targets"])
    head = "| score | " + " | ".join(
        f"τ_w ({b}) | pick ({b}), regret | s ({b}) | % of FT ({b})" for b in budgets) + " |"
    lines = [head, "| --- |" + " ---: | --- | ---: | ---: |" * len(budgets)]
    scores = list(next(iter(summary["targets"].values()))["scores"])
    for score in scores:
        cells = []
        for b in budgets:
            s = summary["targets"][b]["scores"][score]
            pick = "-" if s["pick"] is None else f"{s['pick']}, {s['regret']:.1f}"
            cells += [_num(s["tau_w"]), pick, f"{s['seconds']:.1f}",
                      _num(s["cost_share"] and 100 * s["cost_share"], "{:.1f}")]
        name = f"{score} (baseline)" if score == BASELINE else score
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def values_table(record: dict, summary: dict, budget: str) -> list[str]:
    t = summary["targets"][budget]
    scores = [s for s in t["scores"] if s != BASELINE]
    values = _values(record, budget)[0]
    lines = ["| candidate | fine-tuned top-1 | " + " | ".join(scores) + " |",
             "| --- | ---: |" + " ---: |" * len(scores)]
    for c in record["zoo"]:
        truth = t["truth"].get(c["name"])
        cells = [_num(values[s].get(c["name"]), "{:.4f}") for s in scores]
        lines.append(f"| {c['name']} | {_num(truth and truth['mean'], '{:.1f}')} | "
                     + " | ".join(cells) + " |")
    return lines


def _recipe(finetune: dict) -> str:
    """The ground truth's recipe in words (protocol 1 stored bare Config fields)."""
    if "pretrained" not in finetune:
        return f"Config fields {finetune} for every candidate"
    return (f"{finetune['pretrained']} from each file ({finetune['random']} from random "
            f"initialisation for the random candidate), {finetune['length']} length")


def markdown(record: dict) -> str:
    summary = record["summary"]
    lines = [f"# Selection on {record['table']}{' (quick)' if record['quick'] else ''}", "",
             *zoo_table(record, summary), "",
             f"Fine-tuned top-1 (%) on the fixed test set: mean ± sample std over seeds "
             f"{record['seeds']} with {_recipe(record['finetune'])}; bold: the best candidate; "
             "†: a run whose loss became non-finite (counted at chance).", "",
             *tau_table(summary), "",
             "τ_w: scipy.stats.weightedtau of the score against the mean fine-tuned top-1 "
             "over the candidates; pick: the score's top candidate and its fine-tuned top-1 "
             "below the best (points); s: seconds of features + score over all candidates; "
             "% of FT: of fine-tuning every candidate once (one seed each); n/a: no value for "
             "any candidate (select's source_acc reads torchvision's published top-1, a "
             "workdir's summary.json, or the header of a file jaxsft.export wrote; scores "
             "kept from before export wrote one have none)."]
    lines += ["", "Seed agreement (τ_w of one seed's top-1 against the other seeds' mean, per "
              "seed; added after the results were seen: how far the ground truth agrees with "
              "itself, a rough ceiling for a score):"]
    lines += [f"- {b}: " + ", ".join(_num(v) for v in t["seed_agreement"])
              for b, t in summary["targets"].items()]
    pretraining = {(c["arch"], c["source"]): c["pretrain_s"] for c in record["zoo"]}
    lines += ["", f"Pretraining, all runs: {sum(pretraining.values()):.0f} s; this table, all "
              f"invocations: {record.get('wall_s', 0):.0f} s."]
    for budget, t in summary["targets"].items():
        lines += ["", f"Scores at {budget} labels per class ({t['candidates']} candidates; "
                  f"fine-tuning each once: {t['finetune_s']['one_seed']:.0f} s, all seeds: "
                  f"{t['finetune_s']['all_seeds']:.0f} s):", "",
                  *values_table(record, summary, budget)]
    goal = summary["goal"]
    verdict = "met" if goal["met"] else "not met"
    lines += ["", f"Goal for {goal['score']} (τ_w >= {TAU_GOAL}, above the baseline, under "
              f"{100 * COST_GOAL:.0f}% of the cost, at every target): **{verdict}**."]
    for budget, g in goal["by_target"].items():
        lines.append(f"- {budget}: τ_w {_num(g['tau_w'])} (baseline {_num(g['baseline_tau_w'])})"
                     f"; τ_w >= {TAU_GOAL}: {g['tau_ok']}; beats baseline: "
                     f"{g['beats_baseline']}; cost under {100 * COST_GOAL:.0f}%: {g['cost_ok']}")
    return "\n".join(lines) + "\n"


def across(records: list[dict]) -> dict:
    """Every score's τ_w in every (target, budget) cell of several tables, with the seeds'
    agreement of each cell (its mean over seeds), what each score's pick loses there (points
    of fine-tuned top-1 below the best candidate) and the cells where a score meets the goal's
    τ_w part (>= TAU_GOAL and above the baseline)."""
    cells = {}
    for record in records:
        for budget, t in summarise(record)["targets"].items():
            agree = [a for a in t["seed_agreement"] if a is not None]
            cells[f"{record['table']} {budget}"] = {
                "tau_w": {s: v["tau_w"] for s, v in t["scores"].items()},
                "regret": {s: v["regret"] for s, v in t["scores"].items()},
                "seed_agreement": float(np.mean(agree)) if agree else None}
    scores = list(dict.fromkeys(s for c in cells.values() for s in c["tau_w"]))
    met = {s: [name for name, c in cells.items() if s != BASELINE and _tau_ok(c["tau_w"].get(s))
               and _beats(c["tau_w"].get(s), c["tau_w"][BASELINE])]
           for s in scores}
    return {"cells": cells, "scores": scores, "goal_met_in": met}


def _mean(values: list[float | None], fmt: str = "{:.3f}") -> str:
    """The mean, or n/a if any value is missing (a mean over fewer cells compares nothing)."""
    return "n/a" if None in values else _num(float(np.mean(values)), fmt)


def across_markdown(summary: dict) -> str:
    cells = summary["cells"]
    lines = ["| score | " + " | ".join(cells) + " | mean τ_w | cells meeting the goal's τ_w "
             "| mean regret of the pick |", "| --- |" + " ---: |" * (len(cells) + 3)]
    for score in summary["scores"]:
        taus = [c["tau_w"].get(score) for c in cells.values()]
        regrets = [c["regret"].get(score) for c in cells.values()]
        met = "-" if score == BASELINE else str(len(summary["goal_met_in"][score]))
        name = f"{score} (baseline)" if score == BASELINE else score
        lines.append(f"| {name} | " + " | ".join(_num(t) for t in taus)
                     + f" | {_mean(taus)} | {met} | {_mean(regrets, '{:.1f}')} |")
    lines.append("| seeds' agreement | " + " | ".join(
        _num(c["seed_agreement"]) for c in cells.values()) + " | | | |")
    return "\n".join(lines) + "\n"


def across_plot(summary: dict, path) -> None:
    """τ_w of every score in every cell, the seeds' agreement of each cell as a bar behind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = list(summary["cells"])
    x = np.arange(len(cells))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    agree = [summary["cells"][c]["seed_agreement"] for c in cells]
    ax.bar(x, [np.nan if a is None else a for a in agree], color="0.88",
           label="seeds' agreement")
    for i, score in enumerate(summary["scores"]):
        taus = [summary["cells"][c]["tau_w"].get(score) for c in cells]
        ax.plot(x + (i - len(summary["scores"]) / 2) * 0.05,
                [np.nan if t is None else t for t in taus], marker="o", linestyle="",
                label="source top-1 (baseline)" if score == BASELINE else score,
                color="black" if score == BASELINE else None)
    ax.axhline(TAU_GOAL, color="red", linewidth=1, linestyle="--", label=f"goal {TAU_GOAL}")
    ax.set_xticks(x, [c.replace(" ", "\n") + "\nlabels per class" for c in cells], fontsize=8)
    ax.set_ylabel("weighted Kendall τ against fine-tuning")
    values = [t for c in summary["cells"].values() for t in c["tau_w"].values() if t is not None]
    ax.set_ylim(min([0.0, *values]) - 0.1, 1.05)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, ncol=3, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save(record: dict, path: Path) -> None:
    """The record's JSON at `path`, whole or not at all (written beside it, then renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)


def write(record: dict, path: Path) -> str:
    """The record summarised again, saved at `path` with its report beside it (.md);
    returns the report."""
    record["summary"] = summarise(record)
    save(record, path)
    text = markdown(record)
    path.with_suffix(".md").write_text(text)
    return text


def main(argv=None) -> None:
    """python -m experiments.selection.report RESULTS.json: the summary and .md again.
    python -m experiments.selection.report A.json B.json ... --out F.md: every score's τ_w
    across the tables' targets, written to F.md with F.json and the plot F.png."""
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("records", nargs="+", type=Path)
    p.add_argument("--out", type=Path, help="with several records: the table's .md path")
    args = p.parse_args(argv)
    if len(args.records) == 1 and args.out is None:
        path = args.records[0]
        print(write(json.loads(path.read_text()), path))
        return
    if args.out is None or args.out.suffix != ".md" or args.out.with_suffix(
            ".json").resolve() in {r.with_suffix(".json").resolve() for r in args.records}:
        p.error("several records need --out F.md, a new name (F.json is written beside it)")
    summary = across([json.loads(r.read_text()) for r in args.records])
    text = across_markdown(summary)
    args.out.write_text(text)
    save(summary, args.out.with_suffix(".json"))
    across_plot(summary, args.out.with_suffix(".png"))
    print(text)


if __name__ == "__main__":
    main()
