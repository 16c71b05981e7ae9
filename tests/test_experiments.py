"""experiments/transfer: the font renderer and target splits (fast), and the benchmark's
--quick variant end to end (a few minutes: it pretrains, exports, fine-tunes through fit)."""

import json
from pathlib import Path

import helpers
import numpy as np
import pytest
from PIL import Image

from experiments.transfer import targets
from jaxsft.data import characters as fonts

ROOT = Path(__file__).resolve().parents[1]


def _folder_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_font_renderer_is_deterministic_with_62_classes_of_32x32_images(tmp_path):
    a = fonts.write_character_folders(tmp_path / "a", train_per_face=1, val_per_face=1, seed=3)
    b = fonts.write_character_folders(tmp_path / "b", train_per_face=1, val_per_face=1, seed=3)
    assert _folder_bytes(a) == _folder_bytes(b)
    for split, faces in (("train", fonts.TRAIN_FACES), ("val", fonts.VAL_FACES)):
        classes = sorted(p.name for p in (a / split).iterdir())
        assert len(classes) == 62
        assert all(len(list((a / split / c).glob("*.png"))) == len(faces) for c in classes)
    assert not set(fonts.TRAIN_FACES) & set(fonts.VAL_FACES)  # whole faces held out
    image = np.asarray(Image.open(next((a / "train" / "upper_A").glob("*.png"))))
    assert image.shape == (32, 32) and image.dtype == np.uint8 and image.max() > 128
    other = fonts.write_character_folders(tmp_path / "c", train_per_face=1, val_per_face=1,
                                          seed=4)
    assert _folder_bytes(other) != _folder_bytes(a)


def test_digits_target_keeps_one_test_set_for_every_budget_and_seed(tmp_path):
    _, labels, _ = targets.load_digits_target()
    pool, test = targets.split_pool(labels)
    assert len(test) == 10 * targets.TEST_PER_CLASS
    assert not set(test) & set(np.concatenate(list(pool.values())))
    one = targets.subset(pool, 1, seed=0)
    assert len(one) == 10 and set(one) <= set(targets.subset(pool, 5, seed=0))  # nested
    assert set(one) != set(targets.subset(pool, 1, seed=1))
    root = targets.write_target("digits", tmp_path / "d", 2, seed=0)
    assert len(list((root / "train").rglob("*.png"))) == 20
    assert len(list((root / "test").rglob("*.png"))) == 500


def test_lfw_target_is_faces_against_non_faces_with_50_of_each_held_out(tmp_path):
    images, labels, names = targets.load_lfw_target()  # scikit-image's wheel, offline
    assert images.shape == (200, 25, 25) and images.dtype == np.uint8
    assert names == ["face", "non_face"] and np.bincount(labels).tolist() == [100, 100]
    root = targets.write_target("lfw", tmp_path / "l", 5, seed=3)
    assert sorted(p.name for p in (root / "train").iterdir()) == names
    assert len(list((root / "train").rglob("*.png"))) == 10
    assert len(list((root / "test").rglob("*.png"))) == 2 * targets.TEST_PER_CLASS


def test_surfaces_target_is_six_photographs_cut_into_disjoint_contrast_normalised_tiles(
        tmp_path):
    images, labels, names = targets.load_surfaces_target()  # scikit-image's wheel, offline
    assert images.shape == (600, targets.TILE, targets.TILE) and images.dtype == np.uint8
    assert names == list(targets.SURFACES) and np.bincount(labels).tolist() == [100] * 6
    # brightness says nothing (clipping at 0 and 255 moves a mean by a few levels)
    assert np.allclose(images.reshape(600, -1).mean(1), 128, atol=5)
    assert len({t.tobytes() for t in images}) == 600  # no tile twice
    flat = np.full((8, 8), 7, np.uint8)
    assert (targets.normalise_contrast(flat) == 128).all()  # a flat tile: no noise invented
    root = targets.write_target("surfaces", tmp_path / "s", 2, seed=0)
    assert sorted(p.name for p in (root / "train").iterdir()) == sorted(names)
    assert len(list((root / "train").rglob("*.png"))) == 12
    assert len(list((root / "test").rglob("*.png"))) == 6 * targets.TEST_PER_CLASS


@pytest.mark.slow
def test_quick_benchmark_runs_end_to_end_and_writes_its_table(tmp_path):
    helpers.run_quick_experiment("experiments.transfer.run", tmp_path)
    record = json.loads((tmp_path / "res" / "digits_resnet18_quick.json").read_text())
    assert {(r["arm"], r["budget"]) for r in record["runs"]} == {
        (a, b) for a in ("scratch", "seed", "auto") for b in (1, 5)}
    assert all(0.0 <= r["top1"] <= 1.0 and r["test_count"] == 500 for r in record["runs"])
    table = (tmp_path / "res" / "digits_resnet18_quick.md").read_text()
    assert "| auto |" in table and "**" in table
    assert (tmp_path / "res" / "digits_resnet18_quick.png").stat().st_size > 0
    assert (tmp_path / "runs" / "quick" / "source_resnet18.safetensors").exists()


def test_report_merges_processes_and_filters_into_a_new_file_never_over_an_input(tmp_path):
    """`python -m experiments.transfer.report A B --arms --budgets --out C`: C holds the kept
    arms' and budgets' runs of both; A and B are untouched; a filter without --out is refused."""
    from experiments.transfer import report

    def record(seeds):
        runs = [{"arm": arm, "budget": budget, "seed": s, "top1": 0.5 + 0.01 * s * (i + 1),
                 "test_count": 100} for s in seeds
                for i, arm in enumerate(("auto", "seed", "scratch")) for budget in (5, None)]
        return {"table": "lfw", "model": "resnet18", "runs": runs,
                "arms": {"auto": {}, "seed": {}, "scratch": {}}}

    a, b, out = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    a.write_text(json.dumps(record([1, 2])))
    b.write_text(json.dumps(record([3, 4, 1])))  # seed 1 again: kept once
    before = a.read_bytes(), b.read_bytes()
    report.main([str(a), str(b), "--arms", "auto,seed", "--budgets", "5", "--out", str(out)])
    runs = json.loads(out.read_text())["runs"]
    assert sorted((r["arm"], r["seed"]) for r in runs) == sorted(
        (arm, s) for arm in ("auto", "seed") for s in (1, 2, 3, 4))
    assert {r["budget"] for r in runs} == {5}
    assert (a.read_bytes(), b.read_bytes()) == before
    assert out.with_suffix(".md").is_file() and "seeds [1, 2, 3, 4]" in \
        out.with_suffix(".md").read_text()
    with pytest.raises(SystemExit):
        report.main([str(a), "--arms", "auto"])
    with pytest.raises(SystemExit):
        report.main([str(a), str(b), "--budgets", "5", "--out", str(b)])
    assert (a.read_bytes(), b.read_bytes()) == before


def test_current_auto_gathers_nine_fresh_seeds_per_budget_from_the_committed_results():
    """experiments.transfer.current_auto: auto's current settings and the seed's loop on the
    same 9 seeds at 1-10 labels per class, each cell once, from the arm that ran them."""
    from experiments.transfer import current_auto

    runs = current_auto.gathered()["runs"]
    for budget, seeds in ((1, range(12, 21)), (2, range(12, 21)), (5, range(9, 18)),
                          (10, range(9, 18))):
        for arm in ("auto", "seed"):
            got = sorted(r["seed"] for r in runs if r["arm"] == arm and r["budget"] == budget)
            assert got == list(seeds), (arm, budget)
    p6 = json.loads((current_auto.RESULTS / "digits_resnet18_auto-length_seeds181920_b12.json")
                    .read_text())["runs"]
    want = next(r["top1"] for r in p6 if (r["arm"], r["budget"], r["seed"]) == ("auto", 1, 18))
    assert next(r["top1"] for r in runs if (r["arm"], r["budget"], r["seed"]) ==
                ("auto", 1, 18)) == want
