"""`python -m jaxsft.select --dataset D --candidates ARCH=WEIGHTS ...`: rank pretrained models
for a data set before training, by transferability scores on their features.

Each candidate's penultimate features (the globally average-pooled activations that `fc`
reads) and, where it has a source head, its logits are extracted over the training split (or
a seeded subset of `--max-examples`) with the eval preprocessing, batched and data-parallel
over the local devices (pmap); the scores of `jaxsft.transferability` are computed on them
in float64 and the candidates ranked. `--workdir` keeps each candidate's features (an .npz
per candidate, keyed by spec, data and sizes), so adding a score or a candidate recomputes
nothing else. `--then-train ...` runs `python -m jaxsft.train` with the winner.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args, get_type_hints

import numpy as np

from jaxsft import cli, config
from jaxsft import transferability as T
from jaxsft.config import ConfigError, DataConfig
from jaxsft.workdir import SUMMARY_FILE

PROG = "python -m jaxsft.select"
log = logging.getLogger(__name__)

RANDOM = "random"  # the weights of a randomly initialised baseline candidate
RANDOM_HEAD_CLASSES = 1  # its unused head: features only (no source head, no LEEP)
SCORES: dict[str, str] = {
    "logme": "LogME (You et al. 2021): evidence of a Bayesian linear model; seconds",
    "leep": "LEEP (Nguyen et al. 2020): from the source head's softmax; only with a head",
    "nleep": "N-LEEP (Li et al. 2021): LEEP on a Gaussian mixture of PCA features",
    "sfda": "SFDA (Shao et al. 2022): true-class probability in a self-challenged Fisher space",
    "linear_probe": "5-fold logistic-regression accuracy on the features: slower, faithful",
    "knn": "leave-one-out 10-NN accuracy (cosine) on the features",
    "source_acc": "the weights' published or recorded source top-1 (a baseline ranking)",
}
DEFAULT_SCORES = ("logme", "leep", "nleep", "sfda", "linear_probe", "knn", "source_acc")
# ImageNet-1K acc@1 of torchvision's ResNet weights, from their `meta["_metrics"]` (offline),
# by file name (the name `torchvision:<arch>.<ENUM>` resolves to).
TORCHVISION_ACC1: dict[str, float] = {
    "resnet18-f37072fd.pth": 69.758, "resnet34-b627a593.pth": 73.314,
    "resnet50-0676ba61.pth": 76.13, "resnet50-11ad3fa6.pth": 80.858,
    "resnet101-63fe2227.pth": 77.374, "resnet101-cd907fc2.pth": 81.886,
    "resnet152-394f9c45.pth": 78.312, "resnet152-f82ba261.pth": 82.284,
    "resnext50_32x4d-7cdf4587.pth": 77.618, "resnext50_32x4d-1a0047aa.pth": 81.198,
    "resnext101_32x8d-8ba56ff5.pth": 79.312, "resnext101_32x8d-110c445d.pth": 82.834,
    "resnext101_64x4d-173b62eb.pth": 83.246, "wide_resnet50_2-95faca4d.pth": 78.468,
    "wide_resnet50_2-9ba9bcbe.pth": 81.602, "wide_resnet101_2-32ee1156.pth": 78.848,
    "wide_resnet101_2-d733dc28.pth": 82.51,
}


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One `arch=weights` spec; weights "random" is a randomly initialised model."""

    arch: str
    weights: str

    @property
    def spec(self) -> str:
        return f"{self.arch}={self.weights}"


@dataclasses.dataclass
class Features:
    """One candidate's penultimate features [N, D], labels [N], and source logits [N, Z]
    (None without a source head), with the seconds the extraction took."""

    features: np.ndarray
    labels: np.ndarray
    logits: np.ndarray | None
    seconds: float
    cached: bool = False


def parse_candidate(spec: str) -> Candidate:
    """`arch=weights` -> Candidate; a ConfigError names what is wrong with a bad spec."""
    from jaxsft.models import ARCHITECTURES

    arch, sep, weights = spec.partition("=")
    if not sep or not arch or not weights:
        raise ConfigError(f"candidate {spec!r} is not ARCH=WEIGHTS, e.g. "
                          "resnet50=torchvision:resnet50.IMAGENET1K_V2 or resnet18=random")
    if arch not in ARCHITECTURES:
        raise ConfigError(f"candidate {spec!r}: unknown architecture {arch!r}; known: "
                          f"{', '.join(sorted(ARCHITECTURES))}")
    return Candidate(arch, weights)


# ---------------------------------------------------------------------------- features


def _load(candidate: Candidate, num_classes: int, image_size: int, seed: int):
    """(model, variables, has_source_head) for a candidate, the head kept as loaded
    (`num_classes`: the new head of a headless backbone)."""
    import jax
    import jax.numpy as jnp

    from jaxsft.models import create_model
    from jaxsft.weights import WeightsError, load_weights

    if candidate.weights == RANDOM:
        # One head size for every data set: Flax derives each parameter's key from its path,
        # so the random backbone is the same whatever the head, and the compiled
        # initialisation (~11 s for a resnet18 here) is reused from the cache by every target.
        model = create_model(candidate.arch, RANDOM_HEAD_CLASSES)
        x = jnp.zeros((1, image_size, image_size, 3))
        variables = jax.jit(lambda r: model.init(r, x, train=False))(jax.random.key(seed))
        return model, variables, False
    try:
        variables = load_weights(candidate.weights, candidate.arch)
        has_head = True
    except WeightsError as e:  # a headless backbone: features only, no LEEP
        if "has no classifier head" not in str(e):
            raise
        variables = load_weights(candidate.weights, candidate.arch, num_classes=num_classes,
                                 rng=jax.random.key(seed))
        has_head = False
    classes = int(variables["params"]["fc"]["bias"].shape[0])
    return create_model(candidate.arch, classes), variables, has_head


def extract_features(candidate: Candidate, cfg: DataConfig, *, max_examples: int | None = None,
                     seed: int = 0, compiled: dict | None = None) -> Features:
    """Penultimate features, labels and (with a source head) logits of the train split.

    `compiled` (a dict the caller keeps) shares the compiled forward pass between candidates
    of one architecture, whatever their heads (`features.forward` leaves the head out)."""
    import jax

    from jaxsft import data, features

    started = time.perf_counter()
    info = data.dataset_info(cfg)
    model, variables, has_head = _load(candidate, info.num_classes, cfg.image_size, seed)
    if jax.default_backend() == "cpu":
        from jaxsft import cpu

        model = cpu.accelerate(model)
    compiled = {} if compiled is None else compiled
    apply = compiled[candidate.arch] = compiled.get(candidate.arch) or features.forward(model)
    out = features.penultimate(apply, variables, cfg, train_examples=info.train_examples,
                               max_examples=max_examples, seed=seed)
    return Features(out["features"], out["labels"], out["logits"] if has_head else None,
                    seconds=time.perf_counter() - started)


def _cache_key(candidate: Candidate, cfg: DataConfig, max_examples: int | None,
               seed: int) -> str:
    """What a candidate's features depend on (a local weights path by its mtime and size)."""
    weights = Path(candidate.weights).expanduser()
    stamp = ([weights.stat().st_mtime_ns, weights.stat().st_size] if weights.exists()
             else None)
    key = {"spec": candidate.spec, "stamp": stamp, "dataset": cfg.dataset,
           "data_dir": cfg.data_dir, "split": cfg.train_split, "image_size": cfg.image_size,
           "crop_ratio": cfg.crop_ratio, "image_key": cfg.image_key,
           "label_key": cfg.label_key, "val_fraction": cfg.val_fraction,
           "max_examples": max_examples, "seed": seed}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def features_path(candidate: Candidate, cfg: DataConfig, workdir: str, *,
                  max_examples: int | None = None, seed: int = 0) -> Path:
    """Where `cached_features` keeps a candidate's features under `workdir`."""
    key = _cache_key(candidate, cfg, max_examples, seed)
    return Path(workdir) / "features" / f"{candidate.arch}-{key}.npz"


def cached_features(candidate: Candidate, cfg: DataConfig, workdir: str | None, *,
                    max_examples: int | None = None, seed: int = 0,
                    compiled: dict | None = None) -> Features:
    """`extract_features`, kept in `workdir/features/<arch>-<key>.npz` when a workdir is given."""
    if workdir is None:
        return extract_features(candidate, cfg, max_examples=max_examples, seed=seed,
                                compiled=compiled)
    path = features_path(candidate, cfg, workdir, max_examples=max_examples, seed=seed)
    if path.is_file():
        with np.load(path) as z:
            logits = z["logits"] if z["logits"].size else None
            return Features(z["features"], z["labels"], logits, float(z["seconds"]),
                            cached=True)
    got = extract_features(candidate, cfg, max_examples=max_examples, seed=seed,
                           compiled=compiled)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.npz")
    np.savez(tmp, features=got.features, labels=got.labels, seconds=got.seconds,
             logits=got.logits if got.logits is not None else np.zeros((0, 0), np.float32),
             spec=candidate.spec)
    os.replace(tmp, path)
    return got


# ---------------------------------------------------------------------------- scores


def source_accuracy(candidate: Candidate) -> float | None:
    """The weights' source top-1 (in [0, 1]) where it is known: torchvision's published
    ImageNet acc@1 for its files, a jaxsft workdir's best eval top-1 (summary.json), the
    top-1 `python -m jaxsft.export` recorded in a .safetensors file it wrote."""
    weights = candidate.weights
    if weights.startswith("torchvision:"):
        from jaxsft.weights import WeightsError, torchvision_url

        try:
            weights = torchvision_url(weights[len("torchvision:"):])
        except WeightsError:
            return None
    name = weights.rstrip("/").rsplit("/", 1)[-1]
    if name in TORCHVISION_ACC1:
        return TORCHVISION_ACC1[name] / 100
    summary = Path(weights).expanduser() / SUMMARY_FILE
    if summary.is_file():
        top1 = json.loads(summary.read_text()).get("best_top1")
        return None if top1 is None else float(top1)
    from jaxsft.weights import read_metadata

    top1 = read_metadata(Path(weights).expanduser()).get("jaxsft.source_top1")
    return None if top1 is None else float(top1)


def score(name: str, got: Features, candidate: Candidate, seed: int = 0) -> float | None:
    """One score of a candidate's features (None where it does not apply)."""
    f, y = got.features, got.labels
    if name == "logme":
        return T.logme(f, y)
    if name == "leep":
        return None if got.logits is None else T.leep(T.softmax(got.logits), y)
    if name == "nleep":
        return T.nleep(f, y, seed=seed)
    if name == "sfda":
        return T.sfda(f, y)
    if name == "linear_probe":
        return T.linear_probe_accuracy(f, y, seed=seed)
    if name == "knn":
        return T.knn_accuracy(f, y)
    if name == "source_acc":
        return source_accuracy(candidate)
    raise ConfigError(f"unknown score {name!r}; known: {', '.join(SCORES)}")


def evaluate_candidate(candidate: Candidate, cfg: DataConfig, scores: Sequence[str], *,
                       workdir: str | None = None, max_examples: int | None = None,
                       seed: int = 0, compiled: dict | None = None) -> dict[str, Any]:
    """One row: the candidate's scores and seconds; `error` says why where it failed."""
    row: dict[str, Any] = {"spec": candidate.spec, "arch": candidate.arch,
                           "weights": candidate.weights, "scores": {}, "seconds": {},
                           "errors": {}, "error": None}
    try:
        got = cached_features(candidate, cfg, workdir, max_examples=max_examples, seed=seed,
                              compiled=compiled)
    except cli.user_errors() as e:  # the fix in the spec's words, not load_weights' arch=
        row["error"] = re.sub(r"pass arch='(\w+)'",
                              lambda m: f"write {m.group(1)}={candidate.weights}", str(e))
        return row
    except Exception as e:  # noqa: BLE001 - one broken candidate must not lose the others
        log.exception("candidate %s failed", candidate.spec)
        row["error"] = f"{type(e).__name__}: {e}"
        return row
    row.update(examples=len(got.labels), dim=int(got.features.shape[1]), cached=got.cached,
               source_head=got.logits is not None)
    row["seconds"]["features"] = round(got.seconds, 3)
    return add_scores(row, got, candidate, scores, seed)


def add_scores(row: dict[str, Any], got: Features, candidate: Candidate,
               scores: Sequence[str], seed: int = 0) -> dict[str, Any]:
    """`scores` of a candidate's features into its row: each value (None where it does not
    apply or the features do not allow it, the reason in `errors`) and its seconds."""
    for name in scores:
        started = time.perf_counter()
        try:
            row["scores"][name] = score(name, got, candidate, seed)
        except ValueError as e:
            row["scores"][name], row["errors"][name] = None, str(e)
        row["seconds"][name] = round(time.perf_counter() - started, 3)
    return row


def rank(rows: list[dict[str, Any]], by: str) -> list[dict[str, Any]]:
    """Rows best first by score `by`; rows without it (failed, not applicable) last."""
    def key(row):
        value = row["scores"].get(by)
        return (value is None, -(value if value is not None else 0.0))

    ranked = sorted(rows, key=key)
    for i, row in enumerate(ranked, 1):
        row["rank"] = i if row["scores"].get(by) is not None else None
    return ranked


def select(candidates: Sequence[Candidate], cfg: DataConfig, *,
           scores: Sequence[str] = DEFAULT_SCORES, rank_by: str = "logme",
           workdir: str | None = None, max_examples: int | None = None,
           seed: int = 0) -> dict[str, Any]:
    """Every candidate scored and ranked by `rank_by`: the whole result, as JSON writes it."""
    from jaxsft import data

    for name in (*scores, rank_by):
        if name not in SCORES:
            raise ConfigError(f"unknown score {name!r}; known: {', '.join(SCORES)}")
    info = data.dataset_info(cfg)  # a bad data set or an empty split: one error, before all
    compiled: dict = {}  # one compiled forward pass per architecture
    rows = [evaluate_candidate(c, cfg, scores, workdir=workdir, max_examples=max_examples,
                               seed=seed, compiled=compiled) for c in candidates]
    return {"dataset": cfg.dataset, "split": cfg.train_split, "image_size": cfg.image_size,
            "train_examples": info.train_examples, "max_examples": max_examples,
            "seed": seed, "rank_by": rank_by, "candidates": rank(rows, rank_by)}


# ---------------------------------------------------------------------------- CLI


def _add_data_flags(parser: argparse.ArgumentParser) -> None:
    """jaxsft.train's data flags (the data section of jaxsft.config), same names and help."""
    group = parser.add_argument_group("data", "as python -m jaxsft.train's")
    hints = get_type_hints(DataConfig)
    for f in dataclasses.fields(DataConfig):
        base = next((a for a in get_args(hints[f.name]) if a is not type(None)), hints[f.name])
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS,
                              "help": f"{f.metadata['help']} (default: {f.default})"}
        if base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw.update(type=base, choices=f.metadata["choices"])
        group.add_argument("--" + f.name.replace("_", "-"), **kw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="Rank pretrained models for a data set by transferability "
        "scores on their features, before training.")
    p.add_argument("--candidates", nargs="+", required=True, metavar="ARCH=WEIGHTS",
                   help="candidates: arch=any --weights source, or arch=random")
    p.add_argument("--max-examples", type=int,
                   help="score a seeded subset of this many training examples (default: all)")
    p.add_argument("--seed", type=int, default=0, help="subset, probes and random init")
    p.add_argument("--scores", nargs="+", default=list(DEFAULT_SCORES), choices=list(SCORES),
                   help="scores to compute (default: all)")
    p.add_argument("--rank-by", default="logme", choices=list(SCORES),
                   help="the score that orders the table and picks the winner (default: logme)")
    p.add_argument("--workdir", help="cache each candidate's features here (.npz)")
    p.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    p.add_argument("--then-train", nargs=argparse.REMAINDER, metavar="FLAG",
                   help="last: run python -m jaxsft.train with the winner, these flags and "
                   "the data flags above")
    _add_data_flags(p)
    return p


def _data_config(args: argparse.Namespace) -> tuple[DataConfig, list[str]]:
    """The DataConfig of the given data flags, and those flags again for jaxsft.train."""
    names = {f.name for f in dataclasses.fields(DataConfig)}
    given = {k: v for k, v in vars(args).items() if k in names}
    flags = []
    for k, v in given.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            flags.append(flag if v else "--no-" + k.replace("_", "-"))
        else:
            flags += [flag, str(v)]
    return config.from_dict(given).data, flags


def format_table(result: dict[str, Any]) -> str:
    """The ranked table: every score with the seconds it took, and why a row failed."""
    names = [n for n in SCORES if any(n in r["scores"] for r in result["candidates"])]
    width = max(len(r["spec"]) for r in result["candidates"])
    head = f"{'rank':>4}  {'candidate':<{width}}  {'features':>9}" + "".join(
        f"  {n:>18}" for n in names)
    examples = next((r["examples"] for r in result["candidates"] if "examples" in r), "?")
    lines = [f"{result['dataset']}:{result['split']}, {examples} examples; ranked by "
             f"{result['rank_by']}", head]
    for r in result["candidates"]:
        rank_text = str(r.get("rank") or "-")
        if r["error"]:
            lines.append(f"{rank_text:>4}  {r['spec']:<{width}}  failed: {r['error']}")
            continue
        cells = [f"{r['seconds']['features']:8.1f}s" + ("*" if r.get("cached") else " ")]
        for n in names:
            value = r["scores"].get(n)
            text = "n/a" if value is None else f"{value:.4f}"
            cells.append(f"{text:>9} ({r['seconds'][n]:6.2f}s)")
        lines.append(f"{rank_text:>4}  {r['spec']:<{width}}  " + "  ".join(cells))
    if any(r.get("cached") for r in result["candidates"]):
        lines.append("* features read from the --workdir cache (seconds of the first run)")
    return "\n".join(lines)


def train_command(winner: Candidate, data_flags: Sequence[str],
                  train_flags: Sequence[str]) -> list[str]:
    """`python -m jaxsft.train` with the winner's --model/--weights, the data flags select was
    given, then the --then-train flags (which win where they repeat one)."""
    weights = [] if winner.weights == RANDOM else ["--weights", winner.weights]
    return [sys.executable, "-m", "jaxsft.train", "--model", winner.arch, *weights,
            *data_flags, *train_flags]


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    candidates = [parse_candidate(s) for s in args.candidates]
    if args.max_examples is not None and args.max_examples < 2:
        raise ConfigError(f"--max-examples must be at least 2, got {args.max_examples}")
    cfg, data_flags = _data_config(args)
    result = select(candidates, cfg, scores=args.scores, rank_by=args.rank_by,
                    workdir=args.workdir, max_examples=args.max_examples, seed=args.seed)
    print(format_table(result), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    failed = [r for r in result["candidates"] if r["error"]]
    if failed:
        raise ConfigError(f"{len(failed)} of {len(candidates)} candidate(s) failed: " + "; ".join(
            f"{r['spec']}: {r['error']}" for r in failed))
    if args.then_train is not None:
        best = result["candidates"][0]
        if best.get("rank") is None:
            raise ConfigError(f"no candidate has a {args.rank_by} score to pick a winner")
        command = train_command(parse_candidate(best["spec"]), data_flags, args.then_train)
        print(f"winner: {best['spec']}\n$ python {' '.join(command[1:])}", flush=True)
        raise SystemExit(subprocess.run(command).returncode)


if __name__ == "__main__":
    cli.run(main, prog=PROG)
