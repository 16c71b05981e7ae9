"""The imprinted head alone, before any training step: the nearest-class-mean accuracy that
`--head-init imprint` starts fine-tuning from, on a target of the transfer benchmark.

    python -m experiments.transfer.imprint_only [--table digits] [--seeds 0,1,2] [--budgets 1,5,10]

writes results/<table>_resnet18_imprint_only.json and prints the top-1 per budget and seed.
The head is `jaxsft.imprint.class_mean_head` of the exported source's features of the
labelled images (eval preprocessing, the source's running statistics), exactly what `fit`
builds; the test images are scored with the same features.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"


def top1(weights: Path, data: Path) -> float:
    """Top-1 on data/test of the head imprinted on data/train, with no training step."""
    from jaxsft import features
    from jaxsft.config import DataConfig
    from jaxsft.imprint import class_mean_head
    from jaxsft.models import create_model
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
    head = class_mean_head(train["features"], train["labels"], int(train["labels"].max()) + 1)
    logits = test["features"] @ head["kernel"] + head["bias"]
    return float((logits.argmax(1) == test["labels"]).mean())


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
            acc = top1(weights, target_data(args.table, budget, seed, workdir))
            rows.append({"budget": budget, "seed": seed, "top1": acc})
            print(f"imprinted head, {budget} labels per class, seed {seed}: {100 * acc:.1f}%",
                  flush=True)
    out = Path(args.results) / f"{args.table}_resnet18_imprint_only.json"
    out.write_text(json.dumps({"source": str(weights), "runs": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
