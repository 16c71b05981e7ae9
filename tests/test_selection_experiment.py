"""experiments/selection: the derived sources (fast), the tau summary (fast), and the --quick
variant end to end (minutes: it pretrains, exports, scores with jaxsft.select, fine-tunes
through fit). Structure only: the quick numbers measure nothing."""

import json
from pathlib import Path

import helpers
import numpy as np
import pytest

from experiments.selection import report, sources

ROOT = Path(__file__).resolve().parents[1]


def _fake_chars(root: Path) -> Path:
    from PIL import Image

    for split, per_class in (("train", 3), ("val", 1)):
        for name in ("digit_1", "upper_A", "lower_b"):
            (root / split / name).mkdir(parents=True)
            for k in range(per_class):
                Image.new("L", (4, 4), k).save(root / split / name / f"{k}.png")
    return root


def _classes(root: Path, split: str) -> dict[str, int]:
    return {p.name: len(list(p.glob("*.png"))) for p in sorted((root / split).iterdir())}


def test_letters_only_drops_digits_and_shuffled_keeps_class_sizes(tmp_path):
    chars = _fake_chars(tmp_path / "chars")
    letters = sources.letters_only(chars, tmp_path / "letters")
    assert _classes(letters, "train") == {"lower_b": 3, "upper_A": 3}
    shuffled = sources.shuffled_labels(chars, tmp_path / "shuffled", seed=0)
    assert _classes(shuffled, "train") == _classes(chars, "train")
    assert _classes(shuffled, "val") == _classes(chars, "val")
    moved = [p for p in (shuffled / "train").rglob("*.png")
             if not p.stem.endswith(p.parent.name)]
    assert moved  # some images now carry another class's label


def test_textures_are_deterministic_uint8_of_every_class():
    for kind in sources.TEXTURES:
        a = sources.texture(kind, np.random.default_rng(0))
        assert a.shape == (32, 32) and a.dtype == np.uint8 and a.std() > 5
        assert np.array_equal(a, sources.texture(kind, np.random.default_rng(0)))


def test_weighted_tau_ranks_missing_values_last():
    truth = [90.0, 80.0, 70.0, 10.0]
    assert report.weighted_tau([4.0, 3.0, 2.0, 1.0], truth) == pytest.approx(1.0)
    assert report.weighted_tau([4.0, 3.0, 2.0, None], truth) == pytest.approx(1.0)
    assert report.weighted_tau([1.0, 2.0, 3.0, 4.0], truth) == pytest.approx(-1.0)
    assert report.weighted_tau([None, None, None, 1.0], truth) is None
    assert report.weighted_tau([1.0, 2.0, 3.0, 4.0], [5.0] * 4) is None


@pytest.mark.slow
def test_quick_selection_study_runs_end_to_end_and_writes_its_tables(tmp_path):
    helpers.run_quick_experiment("experiments.selection.run", tmp_path)
    record = json.loads((tmp_path / "res" / "digits_quick.json").read_text())
    names = [c["name"] for c in record["zoo"]]
    assert names == ["resnet18-random", "resnet18-chars-3", "resnet18-chars-6"]
    assert all(Path(c["weights"]).is_file() for c in record["zoo"][1:])
    assert {(r["candidate"], r["budget"]) for r in record["runs"]} == {
        (n, b) for n in names for b in ("2", "10")}
    assert all(0.0 <= r["top1"] <= 1.0 and r["test_count"] == 500 for r in record["runs"])
    for budget in ("2", "10"):
        rows = record["scores"][budget]["candidates"]
        assert sorted(r["name"] for r in rows) == sorted(names)
        assert all(set(r["scores"]) == set(r["seconds"]) - {"features"} for r in rows)
        target = record["summary"]["targets"][budget]
        assert set(target["scores"]) == {*rows[0]["scores"], report.BASELINE}
        assert all(set(s) == {"tau_w", "pick", "regret", "seconds", "cost_share"}
                   for s in target["scores"].values())
        assert target["finetune_s"]["one_seed"] > 0
    assert isinstance(record["summary"]["goal"]["met"], bool)
    table = (tmp_path / "res" / "digits_quick.md").read_text()
    assert "| logme |" in table and "source_top1 (baseline)" in table and "Goal for" in table

    # select's cost against that fine-tuning, features afresh (experiments.selection.cost)
    helpers.run_quick_experiment("experiments.selection.cost", tmp_path)
    cost = json.loads((tmp_path / "res" / "digits_cost_quick.json").read_text())
    assert set(cost) == {"2", "10"}
    for budget, target in cost.items():
        assert target["finetune_s"] == record["summary"]["targets"][budget]["finetune_s"]
        assert all(s["seconds"] > 0 and s["cost_share"] > 0 for s in target["scores"].values())
        acc = {r["name"]: r["scores"]["source_acc"] for r in target["select"]["candidates"]}
        # export wrote each file's evaluated source top-1 into its header; select reads it
        assert acc == {c["name"]: c["source_top1"] for c in record["zoo"]}


def _kept_record(tmp_path: Path) -> tuple[Path, Path, dict[tuple[str, str], tuple]]:
    """A --quick record as the study leaves it, without running it: three candidates' features
    in select's cache (one more candidate failed: no features), their select rows with LogME
    and k-NN kept, fine-tuning runs, the summary. Returns (results dir, workdir, the
    features and labels by (candidate, budget))."""
    from experiments.selection import run
    from experiments.transfer.run import target_dir
    from jaxsft import select

    workdir, results = tmp_path / "runs" / "quick", tmp_path / "res"
    rng = np.random.default_rng(0)
    names = ["random", "near", "far", "broken"]
    zoo = [{"name": n, "arch": "resnet18", "weights": "random" if n == "random" else
            f"zoo/{n}.safetensors", "source": None if n == "random" else "chars", "steps": 6,
            "source_top1": None if n == "random" else 0.1 * (i + 1), "pretrain_s": 1.0}
           for i, n in enumerate(names)]
    features, scores = {}, {}
    for label, per_class in (("2", 8), ("10", 20)):
        cfg = run._score_config(target_dir("digits", int(label), run.SCORE_SEED, workdir))
        rows = []
        for c, signal in zip(zoo, (0.0, 2.0, 0.5, None)):
            candidate = select.Candidate(c["arch"], c["weights"])
            if signal is None:
                rows.append({"spec": candidate.spec, "arch": c["arch"], "weights": c["weights"],
                             "scores": {}, "seconds": {}, "errors": {},
                             "error": "no such file", "name": c["name"]})
                continue
            y = np.arange(3 * per_class) % 3
            f = 0.1 * (rng.normal(size=(len(y), 12)) + signal * np.eye(3)[y] @ rng.normal(
                size=(3, 12)))
            path = select.features_path(candidate, cfg, str(workdir / "select"),
                                        seed=run.SCORE_SEED)
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, features=f.astype(np.float32), labels=y, seconds=0.5,
                     logits=np.zeros((0, 0), np.float32), spec=candidate.spec)
            features[c["name"], label] = (f.astype(np.float32), y)
            row = select.evaluate_candidate(candidate, cfg, ["logme", "knn"],
                                            workdir=str(workdir / "select"), seed=run.SCORE_SEED)
            assert row["cached"] and row["error"] is None
            rows.append({**row, "name": c["name"], "cached": False})  # as the study's first
        scores[label] = {"dataset": cfg.dataset, "rank_by": run.RANK_BY,
                         "candidates": select.rank(rows, run.RANK_BY)}
    runs = [{"candidate": n, "budget": label, "seed": seed, "top1": top1 + 0.01 * seed,
             "wall_s": 10.0}
            for seed in (0, 1) for label in scores
            for n, top1 in zip(names, (0.5, 0.9, 0.7, 0.6))]
    record = {"table": "digits", "quick": True, "finetune": run.FINETUNE["digits"],
              "rank_by": run.RANK_BY, "budgets": list(scores), "seeds": [0, 1],
              "score_seed": run.SCORE_SEED, "zoo": zoo, "runs": runs, "scores": scores,
              "wall_s": 100.0}
    record["summary"] = report.summarise(record)
    results.mkdir()
    (results / "digits_quick.json").write_text(json.dumps(record, indent=1))
    return results, workdir, features


def test_add_scores_merges_only_the_new_scores_into_a_kept_record(tmp_path, capsys):
    from experiments.selection import run
    from jaxsft import transferability as T

    results, workdir, features = _kept_record(tmp_path)
    path = results / "digits_quick.json"
    before = json.loads(path.read_text())
    argv = ["--quick", "--workdir", str(tmp_path / "runs"), "--results", str(results)]
    run.main([*argv, "--add-scores", "sfda"])
    after = json.loads(path.read_text())

    for label in before["budgets"]:
        old = {r["name"]: r for r in before["scores"][label]["candidates"]}
        for row in after["scores"][label]["candidates"]:
            was = old[row["name"]]
            if was["error"]:  # no features: the row stays as it was
                assert row == was
                continue
            f, y = features[row["name"], label]
            assert row["scores"] == {**was["scores"], "sfda": T.sfda(f, y)}
            assert set(row["seconds"]) == {*was["seconds"], "sfda"}
            assert {k: v for k, v in row["seconds"].items() if k != "sfda"} == was["seconds"]
            assert {k: v for k, v in row.items() if k not in ("scores", "seconds")} == {
                k: v for k, v in was.items() if k not in ("scores", "seconds")}
        target, kept = after["summary"]["targets"][label], before["summary"]["targets"][label]
        assert target["scores"]["sfda"]["tau_w"] is not None
        assert {k: v for k, v in target["scores"].items() if k != "sfda"} == kept["scores"]
    unchanged = ("runs", "zoo", "finetune", "budgets", "seeds", "rank_by")
    assert {k: after[k] for k in unchanged} == {k: before[k] for k in unchanged}
    assert after["summary"]["goal"] == before["summary"]["goal"]
    assert after["wall_s"] >= before["wall_s"]
    table = (results / "digits_quick.md").read_text()
    assert "| sfda |" in table and "| logme |" in table

    # again: nothing to add, nothing changes but the time spent
    run.main([*argv, "--add-scores", "sfda", "logme"])
    again = json.loads(path.read_text())
    assert {**again, "wall_s": 0} == {**after, "wall_s": 0}

    # features not cached, or not those the kept scores came from: stops, writes nothing
    written = path.read_text()
    cached = sorted((workdir / "select" / "features").glob("*.npz"))
    with np.load(cached[0]) as z:
        fields = dict(z)
    other = fields["features"] + np.random.default_rng(1).normal(size=fields["features"].shape)
    np.savez(cached[0], **{**fields, "features": other})
    with pytest.raises(SystemExit, match="not those its kept scores came from"):
        run.main([*argv, "--add-scores", "nleep"])
    cached[0].unlink()
    with pytest.raises(SystemExit, match="not cached"):
        run.main([*argv, "--add-scores", "nleep"])
    assert path.read_text() == written
    capsys.readouterr()


def test_report_across_tables_lists_every_cell_and_never_writes_over_a_record(tmp_path):
    results, _, _ = _kept_record(tmp_path)
    first = results / "digits_quick.json"
    record = json.loads(first.read_text())
    second = results / "other.json"
    second.write_text(json.dumps({**record, "table": "other"}))
    out = tmp_path / "across.md"
    report.main([str(first), str(second), "--out", str(out)])
    summary = json.loads(out.with_suffix(".json").read_text())
    assert list(summary["cells"]) == ["digits 2", "digits 10", "other 2", "other 10"]
    for name, cell in summary["cells"].items():
        target = record["summary"]["targets"][name.split()[1]]
        assert cell["tau_w"] == {s: v["tau_w"] for s, v in target["scores"].items()}
        assert cell["regret"] == {s: v["regret"] for s, v in target["scores"].items()}
        for score, met in summary["goal_met_in"].items():
            tau, base = cell["tau_w"].get(score), cell["tau_w"][report.BASELINE]
            assert (name in met) == (score != report.BASELINE and tau is not None
                                     and tau >= report.TAU_GOAL and tau > base)
    assert "| logme |" in out.read_text() and "seeds' agreement" in out.read_text()
    assert out.with_suffix(".png").stat().st_size > 0
    for argv in ([str(first), str(second)],  # no --out
                 [str(first), str(second), "--out", str(second.with_suffix(".md"))]):
        with pytest.raises(SystemExit):
            report.main(argv)
    assert json.loads(second.read_text())["table"] == "other"


def test_calibrate_runs_only_protocol_5s_calibration_cell(tmp_path, monkeypatch, capsys):
    """--calibrate: the random candidate from scratch at 10 labels per class with seed 99,
    printed; no zoo built, nothing scored, no record written."""
    from experiments.selection import run, zoo
    from jaxsft import process

    monkeypatch.setenv("JAXSFT_ONEDNN", "on")  # main sets it; restored after the test
    monkeypatch.setattr(process, "setup", lambda: None)
    monkeypatch.setattr(zoo, "candidates", lambda *a, **k: pytest.fail("zoo built"))
    calls = []

    def cell(table, candidate, budget, seed, workdir, steps):
        calls.append((table, candidate["weights"], budget, seed, steps))
        return {"candidate": candidate["name"], "top1": 0.5}

    monkeypatch.setattr(run, "finetune_candidate", cell)
    run.main(["--table", "surfaces", "--calibrate", "--workdir", str(tmp_path / "w"),
              "--results", str(tmp_path / "res")])
    assert calls == [("surfaces", "random", 10, 99, None)]
    assert 'CALIBRATION {"candidate": "resnet18-random", "top1": 0.5}' in capsys.readouterr().out
    assert not (tmp_path / "res").exists()
