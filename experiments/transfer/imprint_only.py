"""The imprinted head alone, before any training step: the nearest-class-mean accuracy that
`--head-init imprint` starts fine-tuning from, on a target of the transfer benchmark, and how
well its confidence suits the test images.

    python -m experiments.transfer.imprint_only [--table digits] [--seeds 0,1,2] [--budgets 1,5,10]

writes results/<table>_resnet18_imprint_only.json and prints, per budget and seed, the top-1,
the scale `class_mean_head` fits (leave-one-out, training images only), the scale that would
be best on the test images, and the test cross-entropy at the fixed scale 10 and at the fitted
one. The head is `jaxsft.imprint.class_mean_head` of the exported source's features of the
labelled images (eval preprocessing, the source's running statistics), exactly what `fit`
builds; the test images are scored with the same features.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"


def probe(weights: Path, data: Path) -> dict[str, float]:
    """The imprinted head of data/train scored on data/test, with no training step."""
    from jaxsft import features
    from jaxsft.config import DataConfig
    from jaxsft.imprint import SCALE_MAX, SCALE_MIN, class_mean_head
    from jaxsft.models import create_model
    from jaxsft.transferability import golden_section
    from jaxsft.weights import load_weights

    variables = load_weights(weights, "resnet18")
    model = create_model("resnet18", int(variables["params"]["fc"]["bias"].shape[0]))
    apply = features.forward(model)

    def feats(split: str) -> dict[str, np.ndarray]:
        count = sum(1 for _ in (data / split).rglob("*.png"))
        cfg = DataConfig(dataset=f"folder:{data}", train_split=split, image_size=32,
                         augment="none", batch_size=10)
        return features.penultimate(apply, variables, cfg, train_examples=count)

    train, test = feats("train"), feats("test")
    classes = int(train["labels"].max()) + 1
    unit = class_mean_head(train["features"], train["labels"], classes, scale=1.0)
    fitted = class_mean_head(train["features"], train["labels"], classes)
    logits = test["features"] @ unit["kernel"] + unit["bias"]  # at scale 1: linear in it

    def cross_entropy(scale: float) -> float:
        z = scale * logits
        top = z.max(axis=1)
        return float(np.mean(np.log(np.exp(z - top[:, None]).sum(axis=1)) + top
                             - z[np.arange(len(z)), test["labels"]]))

    scale = float(np.linalg.norm(fitted["kernel"]) / np.linalg.norm(unit["kernel"]))
    best = np.exp(golden_section(lambda u: -cross_entropy(np.exp(u)), np.log(SCALE_MIN),
                                 np.log(SCALE_MAX), tol=1e-3))
    return {"top1": float((logits.argmax(1) == test["labels"]).mean()),
            "fitted_scale": round(scale, 3), "best_test_scale": round(float(best), 3),
            "test_cross_entropy_scale_10": round(cross_entropy(10.0), 4),
            "test_cross_entropy_fitted": round(cross_entropy(scale), 4)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--table", choices=("digits", "lfw"), default="digits")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--budgets", default="1,5,10")
    p.add_argument("--workdir", default="runs/transfer")
    p.add_argument("--results", default=str(RESULTS))
    args = p.parse_args(argv)
    from experiments.transfer.run import PRETRAIN, source_weights, target_data
    from jaxsft.process import setup

    setup()
    workdir = Path(args.workdir)
    weights = source_weights("resnet18", workdir, steps=PRETRAIN["steps"],
                             train_per_face=PRETRAIN["train_per_face"])
    rows = []
    for budget in (int(b) for b in args.budgets.split(",")):
        for seed in (int(s) for s in args.seeds.split(",")):
            row = probe(weights, target_data(args.table, budget, seed, workdir))
            rows.append({"budget": budget, "seed": seed, **row})
            print(f"imprinted head, {budget} labels per class, seed {seed}: "
                  f"{100 * row['top1']:.1f}%; scale fitted {row['fitted_scale']:.2f}, best on "
                  f"the test images {row['best_test_scale']:.2f}; test cross-entropy "
                  f"{row['test_cross_entropy_scale_10']:.2f} at 10, "
                  f"{row['test_cross_entropy_fitted']:.2f} fitted", flush=True)
    out = Path(args.results) / f"{args.table}_resnet18_imprint_only.json"
    out.write_text(json.dumps({"source": str(weights), "runs": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
