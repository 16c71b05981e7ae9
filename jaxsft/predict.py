"""`python -m jaxsft.predict --workdir W IMAGE...`: top-k class names with probabilities."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from jaxsft import cli
from jaxsft.config import ConfigError
from jaxsft.evaluate import run_config

PROG = "python -m jaxsft.predict"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Classify images with a training "
                                "run's checkpoint, using the eval preprocessing.")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--workdir", required=True, help="the training run's workdir")
    p.add_argument("--checkpoint", default="best", help="best, latest or a step (default: best)")
    p.add_argument("--top-k", type=int, default=5, help="classes to show per image (default: 5)")
    return p


def predict(workdir: str, images: Sequence[str], checkpoint_step: int | str = "best",
            top_k: int = 5) -> list[list[tuple[str, float]]]:
    """For each image: the top-k (class name, probability) pairs, most likely first."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxsft import checkpoint, data
    from jaxsft.models import create_model
    from jaxsft.trainer import CHECKPOINT_DIR

    cfg = run_config(workdir)
    for p in images:
        if Path(p).is_dir():
            raise ConfigError(f"{p} is a directory, not an image file: pass its images "
                              f"(e.g. {Path(p) / '*.jpg'})")
        if not Path(p).is_file():
            raise ConfigError(f"no such image file: {p}")
    variables, meta = checkpoint.restore_variables(Path(workdir) / CHECKPOINT_DIR,
                                                   checkpoint_step)
    names = meta.get("class_names") or [str(i) for i in range(meta["num_classes"])]
    model = create_model(cfg.model.model, meta["num_classes"], dtype=jnp.dtype(cfg.model.dtype))
    if jax.default_backend() == "cpu":
        from jaxsft import cpu

        model = cpu.accelerate(model)
    batch = np.stack([data.load_image(p, cfg.data) for p in images])
    logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, batch)
    probs = np.asarray(jax.nn.softmax(logits.astype(jnp.float32), axis=-1))
    k = min(top_k, probs.shape[-1])
    return [[(names[i], float(row[i])) for i in np.argsort(-row)[:k]] for row in probs]


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.top_k <= 0:
        raise ConfigError(f"--top-k must be positive, got {args.top_k}")
    step = int(args.checkpoint) if args.checkpoint.isdigit() else args.checkpoint
    for path, top in zip(args.images, predict(args.workdir, args.images, step, args.top_k)):
        print(path)
        for name, p in top:
            print(f"  {100 * p:6.2f}%  {name}")


if __name__ == "__main__":
    cli.run(main, prog=PROG)
