"""Every setting of a run, as frozen dataclasses; parsing from CLI flags; validation; JSON.

No JAX import here: the CLI validates a command line before anything compiles.
Each field's metadata holds its help text, so `--help` and the dataclasses never disagree.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import runpy
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints


class ConfigError(ValueError):
    """A setting the user gave is invalid; the message names the fix."""


def _field(default: Any, help: str, choices: Sequence[str] | None = None) -> Any:
    meta = {"help": help, "choices": tuple(choices) if choices else None}
    if isinstance(default, (list, tuple)):
        return dataclasses.field(default=tuple(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


DTYPES = ("float32", "bfloat16", "float16", "float64")
SCHEDULES = ("constant", "step", "multistep", "cosine", "linear")
OPTIMIZERS = ("sgd", "adamw", "adam", "lars")
RECIPES = ("auto", "seed", "full", "linear-probe", "lp-ft")
HEAD_INITS = ("default", "zeros", "imprint")
LR_SCALINGS = ("none", "linear")
BN_MODES = ("train", "frozen")
AUGMENTS = ("imagenet", "light", "shift", "none")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model: str = _field("resnet18", "architecture name (see jaxsft.models.list_models())")
    weights: str | None = _field(
        None,
        "pretrained weights: a .pth/.safetensors file, an https:// or file:// URL, "
        "torchvision:<arch>.<ENUM>, a directory written by jaxsft.convert, or a jaxsft "
        "workdir (its best checkpoint); none = random initialisation",
    )
    num_classes: int | None = _field(None, "classes of the new head (default: from the data set)")
    dtype: str = _field(
        "float32", "compute dtype; parameters stay float32 (float64 turns on JAX's x64 mode)",
        DTYPES)
    new_head: bool = _field(
        False, "replace the loaded head even when its class count equals the data set's "
        "(a new task with as many classes)")
    head_init: str = _field(
        "default", "a new head's start: default = torch.nn.Linear's init, zeros = BiT's "
        "(Kolesnikov et al. 2020), imprint = the normalised class means of the training "
        "set's features (Qi et al. 2018): a nearest-class-mean classifier", HEAD_INITS)
    imprint_scale: float | None = _field(
        None, "--head-init imprint: the logits' scale (default: fitted to the training set's "
        "leave-one-out cross-entropy; 10 is the fixed scale of auto's first tests, "
        "experiments/transfer protocols 2-3)")

    def __post_init__(self) -> None:
        _check_model(self)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    dataset: str = _field(
        "digits",
        "TFDS name (tf_flowers, cifar10, ...), a directory of images (/path/to/images or "
        "folder:/path/to/images), or the built-in 'digits'",
    )
    data_dir: str | None = _field(None, "TFDS data directory (default: TFDS's own)")
    train_split: str = _field("train", "training split, TFDS syntax such as train[:90%%]")
    eval_split: str | None = _field(
        None, "evaluation split (default: validation, else test, else none)"
    )
    image_size: int = _field(224, "side of the square crops fed to the model")
    crop_ratio: float = _field(0.875, "eval: resize the shorter side to size/ratio, centre crop")
    augment: str = _field(
        "imagenet",
        "train augmentation: imagenet = RandomResizedCrop+flip, light = pad-and-crop+flip, "
        "shift = pad-and-crop without flip (digits, characters, text: a flip changes the class)",
        AUGMENTS,
    )
    batch_size: int = _field(64, "global batch size, split over all devices")
    eval_batch_size: int | None = _field(None, "global eval batch size (default: --batch-size)")
    image_key: str | None = _field(None, "image feature name (default: found from the data set)")
    label_key: str | None = _field(None, "label feature name (default: found from the data set)")
    cache: bool = _field(False, "cache decoded examples in memory (small data sets)")
    shuffle_buffer: int = _field(10_000, "examples in the shuffle buffer")
    val_fraction: float = _field(
        0.1, "folder data sets without a val split: seeded fraction held out for evaluation"
    )
    strict_images: bool = _field(False, "fail on a corrupt image instead of skipping it")

    def __post_init__(self) -> None:
        _check_data(self)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    optimizer: str = _field("sgd", "optimizer; sgd has torch.optim.SGD semantics", OPTIMIZERS)
    lr: float = _field(0.01, "base learning rate (the backbone's)")
    lr_scaling: str = _field(
        "none", "linear = lr x batch/256 (Goyal et al.)", LR_SCALINGS
    )
    momentum: float = _field(0.9, "SGD momentum (beta1 for Adam)")
    nesterov: bool = _field(False, "Nesterov momentum")
    weight_decay: float = _field(0.0, "weight decay (coupled for sgd, decoupled for adamw)")
    decay_bn_and_bias: bool = _field(
        True, "apply weight decay to BatchNorm scales and biases too (torch's default)"
    )
    schedule: str = _field("constant", "learning-rate schedule after warmup", SCHEDULES)
    warmup_epochs: float = _field(0.0, "linear warmup from 0, in epochs")
    milestones: tuple[float, ...] = _field(
        (), "step/multistep: epochs at which the rate is multiplied by --gamma"
    )
    gamma: float = _field(0.1, "step/multistep decay factor")
    step_epochs: float = _field(30.0, "step schedule: decay every this many epochs")
    clip_grad_norm: float | None = _field(None, "clip gradients to this global norm")
    recipe: str = _field(
        "full", "auto = settings chosen from the data set's size (jaxsft.recipes; what "
        "python -m jaxsft.train uses with --weights and no --recipe); seed = the seed "
        "document's plain SGD 0.01/0.9 loop; full = every layer trains, as the flags say; "
        "linear-probe (only the head trains); lp-ft = a linear probe, then full fine-tuning "
        "from that head (Kumar et al. 2022)", RECIPES
    )
    probe_steps: int | None = _field(
        None, "lp-ft: steps of the linear-probe phase (default: half the run)")
    l2sp: float = _field(
        0.0, "L2-SP (Li et al. 2018): coupled penalty alpha (w - w0) pulling the backbone "
        "toward its pretrained weights w0 (0 = off)")
    l2sp_head: float = _field(
        0.0, "L2-SP's coefficient for the head, which has no pretrained value: toward zero")
    head_lr_mult: float = _field(1.0, "learning-rate multiplier of the new head")
    layer_decay: float = _field(
        1.0, "layer-wise rate decay: stage k from the top trains at lr x decay^k"
    )

    def __post_init__(self) -> None:
        _check_optim(self)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    workdir: str = _field("runs/default", "where config, checkpoints, metrics and plots go")
    epochs: float | None = _field(
        None, "training length in epochs (1 when neither --epochs nor --steps is given)")
    steps: int | None = _field(None, "training length in steps (overrides --epochs)")
    label_smoothing: float = _field(0.0, "label smoothing of the cross-entropy")
    bn: str = _field(
        "train", "BatchNorm: train = batch statistics (torch's model.train()), frozen = "
        "running statistics, kept as loaded (always so with --recipe linear-probe)",
        BN_MODES,
    )
    bn_momentum: str = _field(
        "0.1", "BatchNorm running-statistics momentum in torch's convention (0.1 = torch's "
        "default), or auto = min(10 / steps per epoch, 0.1) (Kornblith et al. 2019)")
    ema_decay: float | None = _field(
        None, "keep an exponential moving average of parameters and BatchNorm statistics "
        "with this decay (e.g. 0.99); evaluations and 'best' are then the average's")
    mixup: float = _field(0.0, "Mixup alpha: mixed images and labels (0 = off)")
    cutmix: float = _field(
        0.0, "CutMix alpha (0 = off); with --mixup too, one of the two per batch")
    early_stop: int | None = _field(
        None, "stop after N evaluations without a better top-1 (the best checkpoint is kept)")
    accum_steps: int = _field(1, "gradient accumulation: micro-batches per step")
    seed: int = _field(0, "seed of initialisation, shuffling and augmentation")
    eval_every: int | None = _field(None, "evaluate every N steps (default: each epoch)")
    checkpoint_every: int | None = _field(None, "checkpoint every N steps (default: each epoch)")
    keep: int = _field(3, "latest checkpoints to keep (the best is kept too)")
    async_checkpoints: bool = _field(
        True, "write checkpoints in a background thread while training goes on")
    log_every: int = _field(10, "write train metrics every N steps")
    resume: str | None = _field(None, "checkpoint to start from when the workdir has none")
    overwrite: bool = _field(
        False, "a workdir of a different config: move it aside to <workdir>.replaced-<time> "
        "and start afresh (nothing is deleted)")
    extend: bool = _field(
        False, "let a longer --steps/--epochs continue a run whose learning-rate schedule "
        "depends on its length (cosine, linear): the remaining steps follow the longer "
        "schedule; constant, step and multistep schedules continue without it")

    def __post_init__(self) -> None:
        _check_run(self)

    def total_steps(self, steps_per_epoch: int) -> int:
        """The run's length in steps: --steps, else --epochs (default 1) of the data set."""
        return self.steps or math.ceil((self.epochs or 1.0) * steps_per_epoch)


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        _check_config(self)

    def replace(self, **flat: Any) -> Config:
        """A copy with flat field names changed, e.g. `cfg.replace(lr=0.1, steps=10)`."""
        return _from_flat({**to_flat(self), **flat})

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


_SECTION_CLASSES = {
    "model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "run": RunConfig
}


def _flat_fields() -> dict[str, tuple[str, dataclasses.Field]]:
    out = {}
    for section, cls in _SECTION_CLASSES.items():
        for f in dataclasses.fields(cls):
            assert f.name not in out, f"duplicate config field {f.name}"
            out[f.name] = (section, f)
    return out


FLAT_FIELDS = _flat_fields()


def to_flat(cfg: Config) -> dict[str, Any]:
    return {name: getattr(getattr(cfg, sec), name) for name, (sec, _) in FLAT_FIELDS.items()}


def _from_flat(flat: dict[str, Any]) -> Config:
    unknown = sorted(set(flat) - set(FLAT_FIELDS))
    if unknown:
        raise ConfigError(f"unknown config field(s) {unknown}; known: {sorted(FLAT_FIELDS)}")
    kwargs: dict[str, dict[str, Any]] = {s: {} for s in _SECTION_CLASSES}
    for name, value in flat.items():
        section, f = FLAT_FIELDS[name]
        kwargs[section][name] = _coerce(name, value, _field_type(section, name))
    return Config(**{s: cls(**kwargs[s]) for s, cls in _SECTION_CLASSES.items()})


def from_dict(d: dict[str, Any]) -> Config:
    """Nested ({"model": {...}}) or flat ({"lr": 0.1}) dictionaries, as in JSON files."""
    flat: dict[str, Any] = {}
    for key, value in d.items():
        if key in _SECTION_CLASSES and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return _from_flat(flat)


def _field_type(section: str, name: str) -> Any:
    return get_type_hints(_SECTION_CLASSES[section])[name]


def _coerce(name: str, value: Any, typ: Any) -> Any:
    """Converts JSON values (lists, ints for floats) into the field's type."""
    if value is None:
        return None
    args = [a for a in get_args(typ) if a is not type(None)]
    base = args[0] if get_origin(typ) is not None and get_origin(typ) is not tuple else typ
    if get_origin(typ) is tuple or get_origin(base) is tuple:
        return tuple(float(v) for v in value)
    try:
        if base is bool and not isinstance(value, bool):
            raise TypeError
        return base(value) if base in (int, float, str, bool) else value
    except (TypeError, ValueError):
        raise ConfigError(f"config field {name!r} expects {base.__name__}, got {value!r}") from None


def _check_model(m: ModelConfig) -> None:
    _one_of("dtype", m.dtype, DTYPES)
    _one_of("head-init", m.head_init, HEAD_INITS)
    _positive("num-classes", m.num_classes)
    _positive("imprint-scale", m.imprint_scale)


def _check_data(d: DataConfig) -> None:
    _one_of("augment", d.augment, AUGMENTS)
    for name, value in (("batch-size", d.batch_size), ("image-size", d.image_size),
                        ("eval-batch-size", d.eval_batch_size)):
        _positive(name, value)
    if not 0 < d.crop_ratio <= 1:
        raise ConfigError(f"--crop-ratio must be in (0, 1], got {d.crop_ratio}")
    if not 0 < d.val_fraction < 1:
        raise ConfigError(f"--val-fraction must be in (0, 1), got {d.val_fraction}")


def _check_optim(o: OptimConfig) -> None:
    for name, value, choices in (("schedule", o.schedule, SCHEDULES),
                                 ("optimizer", o.optimizer, OPTIMIZERS),
                                 ("recipe", o.recipe, RECIPES),
                                 ("lr-scaling", o.lr_scaling, LR_SCALINGS)):
        _one_of(name, value, choices)
    for name, value in (("lr", o.lr), ("gamma", o.gamma), ("step-epochs", o.step_epochs),
                        ("head-lr-mult", o.head_lr_mult), ("clip-grad-norm", o.clip_grad_norm)):
        _positive(name, value)
    if not 0 <= o.momentum < 1:
        raise ConfigError(f"--momentum must be in [0, 1), got {o.momentum}")
    if o.nesterov and o.momentum == 0:
        raise ConfigError("--nesterov needs a positive --momentum")
    if o.nesterov and o.optimizer != "sgd":
        raise ConfigError("--nesterov applies to --optimizer sgd only")
    _positive("probe-steps", o.probe_steps)
    if o.probe_steps is not None and o.recipe != "lp-ft":
        raise ConfigError("--probe-steps is the length of lp-ft's probe: add --recipe lp-ft")
    for name, value in (("weight-decay", o.weight_decay), ("warmup-epochs", o.warmup_epochs),
                        ("l2sp", o.l2sp), ("l2sp-head", o.l2sp_head)):
        if value < 0:
            raise ConfigError(f"--{name} must be >= 0, got {value}")
    if not 0 < o.layer_decay <= 1:
        raise ConfigError(f"--layer-decay must be in (0, 1], got {o.layer_decay}")
    if o.schedule == "multistep" and not o.milestones:
        raise ConfigError("--schedule multistep needs --milestones, e.g. --milestones 30 60")


def _check_run(r: RunConfig) -> None:
    _one_of("bn", r.bn, BN_MODES)
    for name, value in (("accum-steps", r.accum_steps), ("keep", r.keep),
                        ("log-every", r.log_every), ("steps", r.steps), ("epochs", r.epochs),
                        ("eval-every", r.eval_every), ("checkpoint-every", r.checkpoint_every)):
        _positive(name, value)
    if not 0 <= r.label_smoothing < 1:
        raise ConfigError(f"--label-smoothing must be in [0, 1), got {r.label_smoothing}")
    _positive("early-stop", r.early_stop)
    for name, value in (("mixup", r.mixup), ("cutmix", r.cutmix)):
        if value < 0:
            raise ConfigError(f"--{name} must be >= 0 (0 = off), got {value}")
    if r.ema_decay is not None and not 0 < r.ema_decay < 1:
        raise ConfigError(f"--ema-decay must be in (0, 1), e.g. 0.99, got {r.ema_decay}")
    if r.bn_momentum != "auto":
        try:
            momentum = float(r.bn_momentum)
        except ValueError:
            momentum = -1.0
        if not 0 < momentum <= 1:
            raise ConfigError(f"--bn-momentum must be auto or a number in (0, 1], got "
                              f"{r.bn_momentum!r}")


def _check_config(cfg: Config) -> None:
    """What no section can check alone. Batch sizes against devices and accumulation are
    checked where the devices are known (`jaxsft.trainer.make_plan`)."""
    m, o, r = cfg.model, cfg.optim, cfg.run
    if o.recipe in ("linear-probe", "lp-ft", "auto") and m.weights is None:
        raise ConfigError(f"--recipe {o.recipe} needs --weights: a random backbone stays random")
    if m.head_init == "imprint" and m.weights is None:
        raise ConfigError("--head-init imprint needs --weights: a random backbone's class means "
                          "classify nothing")
    if m.imprint_scale is not None and m.head_init != "imprint" and o.recipe != "auto":
        raise ConfigError("--imprint-scale sets an imprinted head's scale: add --head-init "
                          "imprint (or --recipe auto)")
    if o.l2sp and m.weights is None and r.resume is None:
        raise ConfigError("--l2sp pulls toward pretrained weights: it needs --weights (use "
                          "--weight-decay for a random start)")
    if r.bn == "frozen" and m.weights is None and r.resume is None:
        raise ConfigError("--bn frozen needs --weights: random running statistics stay random")


def _one_of(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"--{name} {value!r} is not one of {', '.join(choices)}")


def _positive(name: str, value: float | None) -> None:
    if value is not None and value <= 0:
        raise ConfigError(f"--{name} must be positive, got {value}")


# ---------------------------------------------------------------------- CLI


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config field, its default and help taken from the dataclasses."""
    parser.add_argument("--config", help="JSON file or Python file with get_config()")
    for section, cls in _SECTION_CLASSES.items():
        group = parser.add_argument_group(section)
        for f in dataclasses.fields(cls):
            typ = _field_type(section, f.name)
            args = [a for a in get_args(typ) if a is not type(None)]
            base = args[0] if args and get_origin(typ) is not tuple else typ
            help_text = f"{f.metadata['help']} (default: {f.default})"
            kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
            if base is bool:
                kw["action"] = argparse.BooleanOptionalAction
            elif get_origin(typ) is tuple:
                kw.update(nargs="*", type=float)
            else:
                kw["type"] = base
                if f.metadata["choices"]:
                    kw["choices"] = f.metadata["choices"]
            group.add_argument(_flag(f.name), **kw)


def load_file(path: str) -> Config:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path}: no such file")
    if p.suffix == ".py":
        module = runpy.run_path(str(p))
        if "get_config" not in module:
            raise ConfigError(f"--config {path}: a Python config must define get_config()")
        got = module["get_config"]()
        return got if isinstance(got, Config) else from_dict(dict(got))
    try:
        return from_dict(json.loads(p.read_text()))
    except json.JSONDecodeError as e:
        raise ConfigError(f"--config {path}: not valid JSON ({e})") from None


def from_args(args: argparse.Namespace) -> Config:
    """Config file first (if any), then explicit flags on top."""
    flat = dict(vars(args))
    path = flat.pop("config", None)
    base = load_file(path) if path else Config()
    overrides = {k: v for k, v in flat.items() if k in FLAT_FIELDS}
    if "milestones" in overrides:
        overrides["milestones"] = tuple(overrides["milestones"])
    return base.replace(**overrides)


def save(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(cfg.to_json() + "\n")


def load(path: str | Path) -> Config:
    return from_dict(json.loads(Path(path).read_text()))
