"""`python -m jaxsft.export`: a trained workdir's weights as a torchvision state dict.

    python -m jaxsft.export --workdir runs/flowers --out flowers_resnet50.safetensors

writes the best checkpoint's weights (or `--checkpoint latest|N`; the moving average's where the
run kept one) in torchvision's format: `torchvision.models.resnet50(num_classes=N)
.load_state_dict(...)` takes them as they are, and so does `--weights FILE` of the next run.
A .pth name writes torch's format (needs torch); the file appears whole or not at all.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from jaxsft import cli
from jaxsft.config import ConfigError
from jaxsft.workdir import CHECKPOINT_DIR

PROG = "python -m jaxsft.export"


def export(workdir: str | Path, out: str | Path, checkpoint_step: int | str = "best") -> dict:
    """Writes the workdir's checkpoint as a torchvision state dict; returns what was written."""
    from jaxsft.checkpoint import restore_variables
    from jaxsft.weights import save_torch_state_dict

    directory = Path(workdir) / CHECKPOINT_DIR
    if not directory.is_dir():
        raise ConfigError(f"no checkpoints in {workdir}; train there first (python -m "
                          "jaxsft.train --workdir ...)")
    variables, meta = restore_variables(directory, checkpoint_step)
    arch = meta.get("config", {}).get("model", {}).get("model", "resnet")
    path = save_torch_state_dict(variables, out, _provenance(workdir, meta, arch))
    return {"out": str(path), "step": int(meta["step"]), "arch": arch,
            "num_classes": int(variables["params"]["fc"]["kernel"].shape[-1]),
            "class_names": meta.get("class_names")}


def _provenance(workdir: str | Path, meta: dict, arch: str) -> dict[str, str]:
    """Where the weights came from, for a .safetensors header: the architecture, the step,
    the source data set and, where the run evaluated that step, its top-1 there (what
    `python -m jaxsft.select` ranks by as `source_acc`)."""
    from jaxsft.metrics import eval_rows

    out = {"jaxsft.arch": arch, "jaxsft.step": str(int(meta["step"])),
           "jaxsft.dataset": str(meta.get("config", {}).get("data", {}).get("dataset", ""))}
    evals = [r for r in eval_rows(workdir) if r["step"] == int(meta["step"])]
    if evals:
        out["jaxsft.source_top1"] = repr(float(evals[-1]["top1"]))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="a workdir written by python -m jaxsft.train")
    p.add_argument("--out", required=True, help="the file to write: .safetensors or .pth")
    p.add_argument("--checkpoint", default="best",
                   help="best (by validation top-1), latest, or a step number (default: best)")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    step = int(args.checkpoint) if args.checkpoint.isdigit() else args.checkpoint
    if step not in ("best", "latest") and not isinstance(step, int):
        raise ConfigError(f"--checkpoint {args.checkpoint!r}: use best, latest or a step number")
    done = export(args.workdir, args.out, step)
    print(f"wrote step {done['step']} of {args.workdir} to {done['out']}: load it with "
          f"torchvision.models.{done['arch']}(num_classes={done['num_classes']})"
          f".load_state_dict(...), or --weights {done['out']}")


if __name__ == "__main__":
    cli.run(main, prog=PROG)
