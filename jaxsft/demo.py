"""`python -m jaxsft.demo`: why pretraining matters, offline, in a few CPU minutes.

1. Pretrain a ResNet-18 on the handwritten digits 0-4 (scikit-learn's bundled 8x8 digits,
   written as an image folder) and export it in torchvision's state-dict format.
2. Fine-tune that file on the digits 5-9 with only a few labels per class, through the real
   `fit` path (`--weights pretrained.safetensors`), next to the same run from random init.
3. Print the two accuracies side by side, and the plots' paths.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxsft import cli
from jaxsft.config import Config

PROG = "python -m jaxsft.demo"
IMAGE_SIZE = 32


def write_digit_folders(root: Path, labels_per_class: int, seed: int = 0) -> tuple[Path, Path]:
    """Digits 0-4 -> root/pretrain/{train,test}; digits 5-9 -> root/fewshot/{train,test},
    with `labels_per_class` training images per class and the rest held out."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.target))
    counts: dict[tuple[str, int], int] = {}
    for i in order:
        label = int(digits.target[i])
        task = "pretrain" if label < 5 else "fewshot"
        seen = counts.get((task, label), 0)
        counts[task, label] = seen + 1
        if task == "pretrain":
            split = "test" if seen % 5 == 0 else "train"  # a fifth held out
        else:
            split = "train" if seen < labels_per_class else "test"
        folder = root / task / split / f"digit_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (digits.images[i] * (255 / 16)).astype(np.uint8)  # 0..16 -> 0..255
        image = Image.fromarray(pixels, mode="L").resize((IMAGE_SIZE, IMAGE_SIZE),
                                                         Image.BILINEAR)
        image.save(folder / f"{i:04d}.png")
    return root / "pretrain", root / "fewshot"


def demo_config(workdir: Path, dataset: Path, **overrides: object) -> Config:
    # No flips: a mirrored digit is another symbol (or none).
    base = dict(model="resnet18", dataset=f"folder:{dataset}", image_size=IMAGE_SIZE,
                augment="none", batch_size=32, lr=0.05, schedule="cosine",
                weight_decay=5e-4, workdir=str(workdir), seed=0, log_every=5)
    return Config().replace(**{**base, **overrides})


def run(workdir: Path, *, pretrain_epochs: float, finetune_epochs: float,
        labels_per_class: int) -> dict[str, float]:
    from jaxsft.trainer import PLOT_FILE, SUMMARY_FILE, fit
    from jaxsft.weights import save_torch_state_dict

    pretrain_data, fewshot_data = write_digit_folders(workdir / "data", labels_per_class)
    print(f"== 1/3 pretraining resnet18 on digits 0-4 ({pretrain_epochs:g} epochs)")
    state = fit(demo_config(workdir / "pretrain", pretrain_data, epochs=pretrain_epochs))
    exported = workdir / "pretrained_resnet18.safetensors"
    save_torch_state_dict({"params": state.params, "batch_stats": state.batch_stats}, exported)
    print(f"exported in torchvision's state-dict format: {exported}")

    results = {}
    for name, weights in (("fine-tuned", str(exported)), ("from scratch", None)):
        print(f"== {2 if weights else 3}/3 {name} on digits 5-9, "
              f"{labels_per_class} labels per class")
        run_dir = workdir / name.replace(" ", "_").replace("-", "_")
        fit(demo_config(run_dir, fewshot_data, weights=weights, epochs=finetune_epochs,
                        batch_size=16, lr=0.02, log_every=1))
        summary = json.loads((run_dir / SUMMARY_FILE).read_text())
        results[name] = summary["last_top1"]
        results[f"{name} plot"] = str(run_dir / PLOT_FILE)
    print()
    print(f"digits 5-9 with {labels_per_class} labels per class, top-1 on the held-out images:")
    print(f"  fine-tuned from the pretrained resnet18: {100 * results['fine-tuned']:6.2f}%")
    print(f"  trained from random initialisation:      {100 * results['from scratch']:6.2f}%")
    print(f"plots: {results['fine-tuned plot']}  {results['from scratch plot']}")
    return results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="runs/demo", help="(default: runs/demo)")
    p.add_argument("--pretrain-epochs", type=float, default=8, help="(default: 8)")
    p.add_argument("--finetune-epochs", type=float, default=20, help="(default: 20)")
    p.add_argument("--labels-per-class", type=int, default=10, help="(default: 10)")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    from jaxsft.compilation_cache import enable_compilation_cache

    enable_compilation_cache()  # repeated runs load their compiled steps from disk
    args = build_parser().parse_args(argv)
    run(Path(args.workdir), pretrain_epochs=args.pretrain_epochs,
        finetune_epochs=args.finetune_epochs, labels_per_class=args.labels_per_class)


if __name__ == "__main__":
    cli.run(main, prog=PROG)
