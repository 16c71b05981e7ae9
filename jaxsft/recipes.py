"""Recipes that choose settings for you: `auto` (from the data set's size) and `seed` (the
seed document's plain loop). `resolve` turns them into concrete settings before a run
plans anything, so the workdir's config.json records what ran.

`auto` is a rule from the data set's size, not a search (BiT's HyperRule is the anchor,
Kolesnikov et al., ECCV 2020), chosen on the transfer benchmark (experiments/transfer,
"Choosing auto"), where it was tested on held-out labelled subsets:
- an imprinted head (the normalised class means of the training set's features, Qi et al.
  2018): fine-tuning starts from a nearest-class-mean classifier, not from chance, as
  confident as its leave-one-out predictions on the training set warrant (`jaxsft.imprint`);
- SGD momentum 0.9 at lr 0.01 for every layer (a faster head hurt on the benchmark), a
  linear warm-up over the first 10% of the steps, then cosine decay;
- BatchNorm on batch statistics with torch's momentum, no mixup (both hurt short runs);
- length: at least 80 steps and at least 2 epochs, unless --steps or --epochs is given;
- augmentation, unless --augment is given: `shift` (RandomCrop with padding, no flip) when
  the run lasts at least 25 epochs (of whole batches), else `none`. Few images seen many
  times are where shifted views helped (1-2 labels per class on digits, +5 to +9 points);
  at 13 epochs they cost 5 points on LFW's faces.
  No flip: a rule from the data set's size cannot know whether a flip changes the class
  (digits, characters, text), so `--augment light`/`imagenet` stay the user's choice.
`seed`: SGD 0.01/0.9, constant, every layer, torch's head init, nothing else.

Fields the user set keep their value: on the command line those given as flags (or in a
--config file), in the library those that differ from `Config()`'s defaults.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

from jaxsft.config import Config, to_flat
from jaxsft.data import DatasetInfo
from jaxsft.data import steps_per_epoch as steps_per_epoch_of

PRESETS = ("auto", "seed")
MIN_STEPS, MIN_EPOCHS, WARMUP_SHARE = 80, 2, 0.1
SHIFT_FROM_EPOCHS = 25  # auto augments (`shift`) runs at least this many epochs long

SEED: dict[str, Any] = dict(
    recipe="full", optimizer="sgd", lr=0.01, momentum=0.9, nesterov=False, weight_decay=0.0,
    schedule="constant", warmup_epochs=0.0, head_lr_mult=1.0, layer_decay=1.0, l2sp=0.0,
    l2sp_head=0.0, label_smoothing=0.0, mixup=0.0, cutmix=0.0, ema_decay=None, bn="train",
    bn_momentum="0.1", head_init="default", clip_grad_norm=None, lr_scaling="none")
AUTO: dict[str, Any] = dict(SEED, schedule="cosine", head_init="imprint")


def user_set(cfg: Config, given: Collection[str] = ()) -> set[str]:
    """The fields a recipe must not change: `given` and those that differ from the defaults."""
    defaults = to_flat(Config())
    return set(given) | {k for k, v in to_flat(cfg).items() if v != defaults[k]}


def resolve(cfg: Config, info: DatasetInfo, given: Collection[str] = ()) -> tuple[Config, str]:
    """(cfg with recipe auto/seed replaced by concrete settings, a line saying what they are);
    other recipes come back unchanged with an empty line."""
    recipe = cfg.optim.recipe
    if recipe not in PRESETS:
        return cfg, ""
    keep = user_set(cfg, given) - {"recipe"}
    chosen = {k: v for k, v in (AUTO if recipe == "auto" else SEED).items() if k not in keep}
    if recipe == "auto":
        chosen.update(_sized(cfg, info, keep))
    before = to_flat(cfg)
    changed = {k: v for k, v in chosen.items() if k != "recipe" and before[k] != v}
    return cfg.replace(**chosen), f"recipe {recipe}: " + _describe(changed)


def auto_steps(train_examples: int, batch_size: int) -> int:
    """auto's length: at least MIN_STEPS steps and at least MIN_EPOCHS epochs."""
    return max(MIN_STEPS, math.ceil(MIN_EPOCHS * max(train_examples // batch_size, 1)))


def warmup_epochs(steps: int, steps_per_epoch: int) -> float:
    """auto's warm-up, WARMUP_SHARE of a `steps`-step run, in the epochs --warmup-epochs takes."""
    return round(WARMUP_SHARE * steps) / steps_per_epoch


def _sized(cfg: Config, info: DatasetInfo, keep: set[str]) -> dict[str, Any]:
    """auto's steps (unless --steps or --epochs is given), its warm-up, in epochs, and its
    augmentation (unless --augment is given)."""
    steps_per_epoch = steps_per_epoch_of(info, cfg.data)
    out: dict[str, Any] = {}
    if not {"steps", "epochs"} & keep:
        out["steps"] = auto_steps(info.train_examples, cfg.data.batch_size)
    steps = out.get("steps") or cfg.run.total_steps(steps_per_epoch)
    if "warmup_epochs" not in keep:
        out["warmup_epochs"] = warmup_epochs(steps, steps_per_epoch)
    if "augment" not in keep:
        out["augment"] = auto_augment(steps, steps_per_epoch)
    return out


def auto_augment(steps: int, steps_per_epoch: int) -> str:
    """auto's augmentation for a `steps`-step run: shifted views from SHIFT_FROM_EPOCHS
    epochs on, none before."""
    return "shift" if steps >= SHIFT_FROM_EPOCHS * steps_per_epoch else "none"


def _describe(chosen: dict[str, Any]) -> str:
    return ", ".join(f"{k.replace('_', '-')} {v:g}" if isinstance(v, float) else
                     f"{k.replace('_', '-')} {v}" for k, v in sorted(chosen.items())
                     ) or "every setting as given"
