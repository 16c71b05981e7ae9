"""The candidate zoo: pretraining runs through `fit` (the transfer benchmark's source recipe),
each exported at named steps with `python -m jaxsft.export` to a .safetensors file, as a user
would hold them; plus `arch=random`, jaxsft.select's own untrained baseline.

Everything is cached under the workdir: a source folder is written once, a pretraining run is
skipped when all its files are exported, and its record (wall time, held-out top-1 at every
evaluated step) is kept beside the files in zoo/<run>.json.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

from experiments.selection import sources
from experiments.transfer.run import export, pretrain
from jaxsft.data import characters as fonts
from jaxsft.select import RANDOM


@dataclasses.dataclass(frozen=True)
class Pretraining:
    """One pretraining run of `model` on `source` for `steps`, exported at `exports`."""

    name: str
    model: str
    source: str  # chars, letters, shuffled, textures
    steps: int
    exports: tuple[int, ...]


# Fixed before any result was looked at (README, PROTOCOL). ResNet-18 steps: ~0.4 s each here.
RUNS = (
    Pretraining("chars", "resnet18", "chars", 800, (100, 300, 800)),
    Pretraining("letters", "resnet18", "letters", 300, (300,)),
    Pretraining("shuffled", "resnet18", "shuffled", 300, (300,)),
    Pretraining("textures", "resnet18", "textures", 300, (300,)),
    Pretraining("chars34", "resnet34", "chars", 300, (300,)),
)
TRAIN_PER_FACE = 8  # 7,936 character images, as the transfer benchmark's source
QUICK_RUNS = (Pretraining("chars", "resnet18", "chars", 6, (3, 6)),)
QUICK_TRAIN_PER_FACE = 1


def source_folder(source: str, workdir: Path, train_per_face: int) -> Path:
    """The image folder of a source task, written once (atomically, by a rename)."""
    root = workdir / "sources" / f"{source}_{train_per_face}"
    if root.exists():
        return root
    tmp = root.with_suffix(".tmp")
    if source == "textures":
        sources.write_textures(tmp, train_per_class=75 * train_per_face)
    elif source == "chars":
        fonts.write_character_folders(tmp, train_per_face=train_per_face)
    else:
        chars = source_folder("chars", workdir, train_per_face)
        {"letters": sources.letters_only, "shuffled": sources.shuffled_labels}[source](chars, tmp)
    tmp.rename(root)
    return root


def _weights_path(workdir: Path, run: Pretraining, step: int) -> Path:
    return workdir / "zoo" / f"{run.model}-{run.name}-{step}.safetensors"


def _eval_top1(run_dir: Path) -> dict[int, float]:
    """Held-out source top-1 at every evaluated step of a pretraining run."""
    from jaxsft.metrics import eval_rows

    return {int(r["step"]): float(r["top1"]) for r in eval_rows(run_dir)}


def build(run: Pretraining, workdir: Path, train_per_face: int) -> dict:
    """Pretrains and exports one run unless every file exists; returns its record."""
    record_path = workdir / "zoo" / f"{run.name}.json"
    files = [_weights_path(workdir, run, s) for s in run.exports]
    if record_path.exists() and all(f.exists() for f in files):
        return json.loads(record_path.read_text())
    data = source_folder(run.source, workdir, train_per_face)
    run_dir = workdir / "pretrain" / run.name
    every = math.gcd(*run.exports)  # evaluate and checkpoint at every named step
    started = time.perf_counter()
    pretrain(run.model, data, run_dir, steps=run.steps, eval_every=every,
             keep=run.steps // every + 1)
    wall = time.perf_counter() - started
    for step, out in zip(run.exports, files):
        export(run_dir, out, step)
    record = {**dataclasses.asdict(run), "pretrain_s": round(wall, 1),
              "top1": _eval_top1(run_dir), "train_per_face": train_per_face}
    record_path.write_text(json.dumps(record, indent=1))
    return json.loads(record_path.read_text())  # int step keys become strings either way


RANDOM_CANDIDATE = {"name": "resnet18-random", "arch": "resnet18", "weights": RANDOM,
                    "source": None, "steps": 0, "source_top1": None, "pretrain_s": 0.0}


def candidates(workdir: Path, *, quick: bool = False) -> list[dict]:
    """The zoo, pretrained and exported where needed: name, arch, weights (a file or
    "random"), source, steps, the held-out source top-1 (None for random) and the seconds
    of the pretraining run it came from."""
    runs, per_face = (QUICK_RUNS, QUICK_TRAIN_PER_FACE) if quick else (RUNS, TRAIN_PER_FACE)
    zoo = [dict(RANDOM_CANDIDATE)]
    for run in runs:
        record = build(run, workdir, per_face)
        for step in run.exports:
            zoo.append({"name": f"{run.model}-{run.name}-{step}", "arch": run.model,
                        "weights": str(_weights_path(workdir, run, step)),
                        "source": run.source, "steps": step,
                        "source_top1": record["top1"][str(step)],
                        "pretrain_s": record["pretrain_s"]})
    return zoo
