"""`python -m jaxsft.demo`: fine-tuning well, offline, in about 3 CPU minutes.

1. Pretrain a ResNet-18 on 62 printed characters rendered from the fonts in matplotlib's
   wheel (the transfer benchmark's source, `jaxsft.data.characters`) and export it in
   torchvision's state-dict format.
2. Fine-tune that file on scikit-learn's handwritten digits 0-9 with a few labels per class,
   through the real `fit` path (`--weights pretrained.safetensors`), with `--recipe auto`
   (what `python -m jaxsft.train --weights ...` uses) and with the seed document's plain loop
   (`--recipe seed`), next to training from random initialisation; every run as long as
   auto chooses.
3. Print the three accuracies side by side, and the plots' paths.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxsft import cli
from jaxsft.config import Config

PROG = "python -m jaxsft.demo"
ARM_LABELS = {"auto": "fine-tuned, --recipe auto (the default)",
              "seed": "fine-tuned, --recipe seed (SGD 0.01/0.9, constant)",
              "scratch": "trained from random initialisation"}
IMAGE_SIZE = 32
FEWSHOT_BATCH = 8  # as the transfer benchmark


def write_digits_target(root: Path, labels_per_class: int, seed: int = 0,
                        test_per_class: int = 50) -> Path:
    """scikit-learn's digits as root/{train,test}/digit_<k>/*.png (8x8 upscaled to 32x32):
    `labels_per_class` training images per class, the next `test_per_class` held out."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    seen: dict[int, int] = {}
    for i in order:
        label = int(digits.target[i])
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > labels_per_class + test_per_class:
            continue
        split = "train" if seen[label] <= labels_per_class else "test"
        folder = root / split / f"digit_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (digits.images[i] * (255 / 16)).astype(np.uint8)  # 0..16 -> 0..255
        Image.fromarray(pixels, mode="L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR).save(
            folder / f"{i:04d}.png")
    return root


def demo_config(workdir: Path, dataset: Path, **overrides: object) -> Config:
    # No flips: a mirrored digit is another symbol (or none). The eval view for all but auto.
    base = dict(model="resnet18", dataset=f"folder:{dataset}", image_size=IMAGE_SIZE,
                augment="none", batch_size=32, workdir=str(workdir), seed=0, log_every=5)
    return Config().replace(**{**base, **overrides})


# From random initialisation: a higher rate, cosine and weight decay (pretraining, scratch).
SCRATCH = dict(lr=0.05, schedule="cosine", weight_decay=5e-4)


def run(workdir: Path, *, pretrain_steps: int, labels_per_class: int,
        finetune_steps: int | None = None, renderings: int = 2) -> dict[str, float]:
    from jaxsft import data, recipes
    from jaxsft.data.characters import write_character_folders
    from jaxsft.metrics import eval_rows
    from jaxsft.trainer import PLOT_FILE, fit
    from jaxsft.weights import save_torch_state_dict

    chars = write_character_folders(workdir / "data" / "characters", train_per_face=renderings)
    fewshot_data = write_digits_target(workdir / "data" / "digits", labels_per_class)
    print(f"== 1/4 pretraining resnet18 on 62 printed characters ({pretrain_steps} steps)")
    state = fit(demo_config(workdir / "pretrain", chars, steps=pretrain_steps,
                            eval_every=pretrain_steps, **SCRATCH))
    exported = workdir / "pretrained_resnet18.safetensors"
    save_torch_state_dict({"params": state.params, "batch_stats": state.batch_stats}, exported)
    print(f"exported in torchvision's state-dict format: {exported}")

    # The digits are 10 new classes for the 62-class head: --new-head. Every arm trains as
    # long as auto chooses.
    pretrained = dict(weights=str(exported), new_head=True)
    # auto chooses its augmentation, as for a user who gives no --augment: the field back at
    # its default is unset to it (shifted views when the run repeats each image 10+ times).
    auto = dict(pretrained, recipe="auto", augment=Config().data.augment)
    arms = {"auto": auto, "seed": dict(pretrained, recipe="seed"), "scratch": SCRATCH}
    fewshot = demo_config(workdir, fewshot_data, batch_size=FEWSHOT_BATCH,
                          **({"steps": finetune_steps} if finetune_steps else {}))
    steps = recipes.resolve(fewshot.replace(**arms["auto"]),
                            data.dataset_info(fewshot.data))[0].run.steps
    evals = {}
    for i, (name, recipe) in enumerate(arms.items()):
        print(f"== {i + 2}/4 {ARM_LABELS[name]} on the digits, {labels_per_class} labels "
              "per class")
        fit(fewshot.replace(workdir=str(workdir / name), steps=steps, eval_every=steps,
                            log_every=max(1, steps // 4), **recipe))
        evals[name] = eval_rows(workdir / name)
    count = int(evals["auto"][-1]["count"])
    print(f"\nhandwritten digits with {labels_per_class} labels per class, top-1 on the {count} "
          f"held-out images after {steps} steps:")
    for name, rows in evals.items():
        print(f"  {ARM_LABELS[name] + ':':54}{100 * rows[-1]['top1']:7.2f}%")
    print("plots: " + "  ".join(str(workdir / name / PLOT_FILE) for name in arms))
    return {name: rows[-1]["top1"] for name, rows in evals.items()}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="runs/demo", help="(default: runs/demo)")
    p.add_argument("--pretrain-steps", type=int, default=300, help="(default: 300)")
    p.add_argument("--finetune-steps", type=int,
                   help="fine-tuning steps of every arm (default: what --recipe auto chooses)")
    p.add_argument("--labels-per-class", type=int, default=5, help="(default: 5)")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    run(Path(args.workdir), pretrain_steps=args.pretrain_steps,
        labels_per_class=args.labels_per_class, finetune_steps=args.finetune_steps)


if __name__ == "__main__":
    cli.run(main, prog=PROG)
