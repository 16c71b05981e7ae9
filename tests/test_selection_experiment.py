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
