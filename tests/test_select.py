"""`python -m jaxsft.select`: features, ranking, cache and errors, on generated image folders.

Three candidates for a target task (hue of textured 16x16 images): a random resnet18, one
trained briefly (jaxsft.trainer.fit) on flat images of the same three hues (the candidate
that resembles the target) and one trained on grey images of three brightness levels.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxsft import cli, select
from jaxsft.config import Config

SIZE = 16
HUES = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]], float)
PROG = "python -m jaxsft.select"


def _textured(rng, hue: int) -> np.ndarray:
    """The target: stripes of one hue in two shades at a random angle, noisy."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    angle, phase = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
    wave = np.sin(1.2 * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)[..., None] > 0
    base = HUES[hue] * rng.uniform(0.5, 1.2)
    return np.where(wave, base, 0.4 * base) + rng.normal(0, 25, (SIZE, SIZE, 3))


def _flat(rng, hue: int) -> np.ndarray:
    """Like the target: one hue, flat, noisy."""
    return HUES[hue] * rng.uniform(0.6, 1.1) + rng.normal(0, 30, (SIZE, SIZE, 3))


def _grey(rng, level: int) -> np.ndarray:
    """Unlike the target: grey at one of three brightness levels."""
    grey = rng.uniform(0.8, 1.2) * (50 + 80 * level)
    return (grey + rng.normal(0, 30, (SIZE, SIZE, 1))).repeat(3, 2)


def _folder(root: Path, draw, classes: list[str], per_class: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("val", 4)):
        for label, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                image = np.clip(draw(rng, label), 0, 255).astype(np.uint8)
                Image.fromarray(image).save(root / split / name / f"{i}.png")
    return root


def _train(folder: Path, workdir: Path, evaluate: bool) -> Path:
    """24 steps from random initialisation; without `evaluate`, no eval step to compile (the
    workdir's best checkpoint is then its last)."""
    steps = 24
    cfg = Config().replace(
        model="resnet18", dataset=f"folder:{folder}", image_size=SIZE, augment="none",
        batch_size=16, lr=0.03, steps=steps, eval_every=steps, checkpoint_every=steps,
        log_every=steps, bn_momentum="0.3", async_checkpoints=False, workdir=str(workdir),
        eval_split=None if evaluate else "none")
    from jaxsft.trainer import fit

    fit(cfg)
    return workdir


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("select")
    hues = ["red", "green", "blue"]
    target = _folder(root / "target", _textured, hues, 16, 0)
    like = _folder(root / "like", _flat, hues, 24, 1)
    unlike = _folder(root / "unlike", _grey, ["dark", "mid", "light"], 24, 2)
    return {"root": root, "target": target, "like": _train(like, root / "run-like", True),
            "unlike": _train(unlike, root / "run-unlike", False)}


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as stop:
        cli.run(select.main, [str(a) for a in argv], prog=PROG)
    out, err = capsys.readouterr()
    return stop.value.code, out, err


def _base(zoo, *candidates: str) -> list[str]:
    return ["--dataset", f"folder:{zoo['target']}", "--image-size", SIZE, "--batch-size", 16,
            "--candidates", *candidates]


def test_the_candidate_that_resembles_the_target_ranks_first_and_features_are_cached(
        zoo, tmp_path, capsys):
    like, unlike = f"resnet18={zoo['like']}", f"resnet18={zoo['unlike']}"
    argv = [*_base(zoo, "resnet18=random", unlike, like), "--workdir", tmp_path / "w",
            "--json", tmp_path / "r.json", "--scores", "logme", "leep", "knn", "source_acc"]
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "r.json").read_text())
    rows = result["candidates"]
    assert [r["spec"] for r in rows][0] == like, out
    assert [r["rank"] for r in rows] == [1, 2, 3]
    assert all(r["examples"] == 48 and r["dim"] == 512 for r in rows)  # N < D: LogME's case
    assert {r["spec"]: r["source_head"] for r in rows} == {
        "resnet18=random": False, like: True, unlike: True}
    assert rows[0]["scores"]["leep"] is not None
    assert 0 <= rows[0]["scores"]["source_acc"] <= 1  # its summary.json's best top-1
    assert rows[1]["scores"]["source_acc"] is None  # no evaluation, no summary top-1
    assert like in out.splitlines()[2] and "logme" in out.splitlines()[1]

    # the features are fc's input: the model's own logits are the head applied to them
    import jax

    from jaxsft import features, steps
    from jaxsft.models import create_model
    from jaxsft.weights import load_weights

    variables = load_weights(str(zoo["like"]), "resnet18")
    fc = variables["params"]["fc"]
    model = create_model("resnet18", fc["bias"].shape[0])
    images = np.random.default_rng(0).normal(
        size=(jax.local_device_count(), 2, SIZE, SIZE, 3)).astype(np.float32)
    got = np.asarray(features.forward(model)(
        steps.replicate(features._backbone(variables)), images)).reshape(-1, 512)
    want = np.asarray(model.apply(variables, images.reshape(-1, SIZE, SIZE, 3), train=False))
    np.testing.assert_allclose(got @ np.asarray(fc["kernel"]) + fc["bias"], want,
                               rtol=1e-5, atol=1e-5 * np.abs(want).max())

    # a second run with other scores reads every candidate's features from the cache
    code, out, err = _run([*argv[:-3], "nleep", "sfda", "--rank-by", "sfda"], capsys)
    assert code == 0, err
    again = json.loads((tmp_path / "r.json").read_text())
    assert all(r["cached"] for r in again["candidates"])
    assert set(again["candidates"][0]["scores"]) == {"logme", "nleep", "sfda"}
    assert again["rank_by"] == "sfda" and "ranked by sfda" in out
    assert all(0 < r["scores"]["sfda"] <= 1 for r in again["candidates"])
    first = {r["spec"]: r["scores"]["logme"] for r in rows}
    assert {r["spec"]: r["scores"]["logme"] for r in again["candidates"]} == first


def test_a_seeded_subset_of_max_examples(zoo, tmp_path, capsys):
    argv = [*_base(zoo, "resnet18=random"), "--max-examples", 20, "--batch-size", 8,
            "--scores", "logme", "--json", tmp_path / "r.json"]
    code, _, err = _run(argv, capsys)
    assert code == 0, err
    (row,) = json.loads((tmp_path / "r.json").read_text())["candidates"]
    assert row["examples"] == 20 and row["scores"]["logme"] is not None


def test_a_failing_candidate_keeps_the_others_scores_and_exits_2(zoo, tmp_path, capsys):
    argv = [*_base(zoo, "resnet18=random", f"resnet34={zoo['like']}"), "--scores", "logme",
            "--json", tmp_path / "r.json"]
    code, out, err = _run(argv, capsys)
    assert code == 2
    assert err.count("\n") == 1 and "resnet34=" in err and "resnet18" in err, err
    rows = json.loads((tmp_path / "r.json").read_text())["candidates"]
    assert rows[0]["spec"] == "resnet18=random" and rows[0]["scores"]["logme"] is not None
    assert rows[1]["rank"] is None and "resnet18" in rows[1]["error"]
    assert "failed:" in out


@pytest.mark.parametrize("candidates,extra,message", [
    (["resnet18"], [], "is not ARCH=WEIGHTS"),
    (["=random"], [], "is not ARCH=WEIGHTS"),
    (["resnet19=random"], [], "unknown architecture 'resnet19'"),
    (["resnet18=random"], ["--train-split", "train[:0]"], "has no examples"),
], ids=["no-weights", "no-arch", "unknown-arch", "empty-split"])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, candidates, extra, message):
    folder = _folder(tmp_path / "data", _flat, ["a", "b"], 2, 0)
    argv = ["--dataset", f"folder:{folder}", "--image-size", SIZE, "--batch-size", 4,
            "--candidates", *candidates, *extra]
    code, _, err = _run(argv, capsys)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert err.startswith(f"{PROG}: error: ")


def test_then_train_passes_the_winner_the_data_flags_and_the_rest():
    winner = select.parse_candidate("resnet50=torchvision:resnet50.IMAGENET1K_V2")
    command = select.train_command(winner, ["--dataset", "d", "--image-size", "64"],
                                   ["--workdir", "w", "--steps", "3"])
    assert command == [sys.executable, "-m", "jaxsft.train", "--model", "resnet50", "--weights",
                       "torchvision:resnet50.IMAGENET1K_V2", "--dataset", "d", "--image-size",
                       "64", "--workdir", "w", "--steps", "3"]
    random = select.train_command(select.parse_candidate("resnet18=random"), [], [])
    assert "--weights" not in random


def test_source_accuracy_of_torchvision_weights_and_workdirs(tmp_path):
    tv = select.Candidate("resnet50", "torchvision:resnet50.IMAGENET1K_V2")
    assert select.source_accuracy(tv) == pytest.approx(0.80858)
    (tmp_path / "summary.json").write_text(json.dumps({"best_top1": 0.5}))
    assert select.source_accuracy(select.Candidate("resnet18", str(tmp_path))) == 0.5
    assert select.source_accuracy(select.Candidate("resnet18", "random")) is None


def test_the_published_accuracies_are_torchvisions():
    models = pytest.importorskip("torchvision.models")
    for name in dir(models):
        if name.endswith("_Weights") and "res" in name.lower():
            for w in getattr(models, name):
                file = w.url.rsplit("/", 1)[-1]
                assert select.TORCHVISION_ACC1[file] == w.meta["_metrics"]["ImageNet-1K"]["acc@1"]


def test_a_random_candidate_is_the_same_network_for_any_number_of_classes():
    """arch=random is initialised with one head size for every data set (so its compiled
    initialisation is shared); its backbone is the one a model with the data set's own head
    gets from the same seed, because Flax keys each parameter by its path."""
    import jax
    import jax.numpy as jnp

    from jaxsft.models import create_model

    model, variables, has_head = select._load(select.Candidate("resnet18", "random"), 7, 16, 3)
    assert not has_head
    x = jnp.zeros((1, 16, 16, 3))
    # jitted as select initialises it (eager init rounds differently, ~1e-8)
    own = jax.jit(lambda r: create_model("resnet18", 7).init(r, x, train=False))(
        jax.random.key(3))
    backbone = {k: v for k, v in variables["params"].items() if k != "fc"}
    assert jax.tree.all(jax.tree.map(np.array_equal, backbone, {
        k: v for k, v in own["params"].items() if k != "fc"}))
    assert jax.tree.all(jax.tree.map(np.array_equal, variables["batch_stats"],
                                     own["batch_stats"]))
    other = create_model("resnet18", 2).init(jax.random.key(4), x, train=False)  # another seed
    assert not np.array_equal(other["params"]["conv1"]["kernel"],
                              variables["params"]["conv1"]["kernel"])
