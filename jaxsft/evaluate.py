"""`python -m jaxsft.evaluate --workdir W`: top-1, top-5 and loss over a full split."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from jaxsft import cli, config
from jaxsft.config import ConfigError

PROG = "python -m jaxsft.evaluate"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Evaluate a training run's checkpoint "
                                "over every example of a split.")
    p.add_argument("--workdir", required=True, help="the training run's workdir")
    p.add_argument("--checkpoint", default="best",
                   help="best (by validation top-1), latest, or a step number (default: best)")
    p.add_argument("--dataset", help="evaluate on another data set (default: the run's)")
    p.add_argument("--data-dir", help="TFDS data directory (default: the run's)")
    p.add_argument("--eval-split", help="split to evaluate (default: the run's eval split)")
    p.add_argument("--eval-batch-size", type=int, help="global eval batch size")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p


def run_config(workdir: str, **overrides: object) -> config.Config:
    """The config a workdir was trained with, with the given (non-None) fields replaced."""
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{workdir} is not a jaxsft workdir (no config.json); "
                          "pass the --workdir of a training run")
    cfg = config.load(path).replace(workdir=str(workdir))  # the workdir may have moved
    return cfg.replace(**{k: v for k, v in overrides.items() if v is not None})


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    cfg = run_config(args.workdir, dataset=args.dataset, data_dir=args.data_dir,
                     eval_split=args.eval_split, eval_batch_size=args.eval_batch_size)
    step = int(args.checkpoint) if args.checkpoint.isdigit() else args.checkpoint
    if step not in ("best", "latest") and not isinstance(step, int):
        raise ConfigError(f"--checkpoint {args.checkpoint!r}: use best, latest or a step number")
    cli.use_dtype(cfg.model.dtype)
    from jaxsft.trainer import evaluate

    result = evaluate(cfg, step)
    if args.json:
        print(json.dumps(result))
    else:
        top5 = (f"  top-5 {100 * result['top5']:.2f}%" if result["num_classes"] > 5 else "")
        print(f"step {result['step']} on {cfg.data.dataset}:{result['split']}: "
              f"top-1 {100 * result['top1']:.2f}%{top5}  loss {result['loss']:.4f}  "
              f"({result['count']} examples)")


if __name__ == "__main__":
    cli.run(main, prog=PROG)
