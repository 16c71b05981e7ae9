"""Convert pretrained weights into a jaxsft weights directory (an Orbax checkpoint + JSON).

    python -m jaxsft.convert --arch resnet50 --source torchvision:resnet50.IMAGENET1K_V2 \\
        --out weights/resnet50 [--num-classes N --seed S] [--force]

The directory holds `variables/` (Orbax checkpoint of {"params", "batch_stats"}) and
`jaxsft_weights.json` (arch, num_classes, source, sha256 of the source file, jaxsft version).
`load_weights(DIR, arch)` reads it back. The directory is written under a temporary name
beside DIR and renamed at the end, so a failure never leaves a half-written DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxsft.models import list_models
from jaxsft.process import setup
from jaxsft.weights import (
    METADATA_FILE,
    VARIABLES_DIR,
    WeightsError,
    file_sha256,
    load_weights,
    read_converted_metadata,
    resolve_source,
    temp_sibling,
)

__all__ = ["convert", "main"]


def convert(arch: str, source: str, out: str | os.PathLike, *, num_classes: int | None = None,
            seed: int = 0, force: bool = False, cache_dir: str | os.PathLike | None = None,
            sha256: str | None = None) -> Path:
    """Write `load_weights(source, arch, num_classes, seed)` as a jaxsft weights directory."""
    out = Path(out).absolute()
    if out.exists() and not force:
        raise WeightsError(f"{out} already exists; pass --force to replace it")
    local = resolve_source(source, arch, cache_dir=cache_dir, sha256=sha256)  # downloads once
    variables = load_weights(source, arch, num_classes, seed, cache_dir=cache_dir,
                             sha256=sha256)
    fc_classes = int(variables["params"]["fc"]["kernel"].shape[1])
    meta = {
        "format": "jaxsft-weights",
        "format_version": 1,
        "arch": arch,
        "num_classes": fc_classes,
        "source": str(source),
        # A converted directory as source: record the hash of the file it came from.
        "sha256": (read_converted_metadata(local).get("sha256") if local.is_dir()
                   else file_sha256(local)),
        "jaxsft_version": _version(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(out)
    tmp.mkdir()
    try:
        _write(tmp, variables, meta)
        _replace(tmp, out)
    except BaseException:
        _discard(tmp)
        raise
    return out


def _write(directory: Path, variables: dict[str, Any], meta: dict[str, Any]) -> None:
    import orbax.checkpoint as ocp

    from jaxsft.checkpoint import NO_ROOM, os_error_code

    try:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(directory / VARIABLES_DIR, variables)
            checkpointer.wait_until_finished()
    except Exception as e:  # Orbax re-raises a failed write (e.g. a full disk) as ValueError
        code = os_error_code(e)
        if code is None:
            raise
        fix = "free space there" if code in NO_ROOM else "fix that"
        raise OSError(f"could not write in {directory.parent}: {os.strerror(code)}; {fix} or "
                      "choose another --out") from e
    (directory / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def _discard(directory: Path, quiet: float = 1.0, limit: float = 60.0) -> None:
    """Remove a failed write's directory once nothing writes to it any more.

    Orbax raises at the first failed write while TensorStore finishes the others in the
    background, recreating missing parent directories: a directory removed at once can come
    back. So it is removed only after nothing in it has changed for `quiet` seconds, and it must
    then stay away for as long (bounded by `limit` seconds in all).
    """
    deadline = time.monotonic() + limit
    last, since = _listing(directory), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = _listing(directory)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            if now is None:
                return
            shutil.rmtree(directory, ignore_errors=True)
    shutil.rmtree(directory, ignore_errors=True)


def _listing(directory: Path) -> tuple | None:
    """Every entry under `directory` with its size, or None if it does not exist."""
    if not directory.exists():
        return None
    entries = []
    for root, dirs, files in os.walk(directory):
        entries += [(root, name, -1) for name in dirs]
        for name in files:
            try:
                entries.append((root, name, os.stat(os.path.join(root, name)).st_size))
            except OSError:  # renamed or removed meanwhile: the next listing shows where
                pass
    return tuple(sorted(entries))


def _replace(tmp: Path, out: Path) -> None:
    """Move `tmp` to `out`; an existing `out` is moved aside first and removed only after."""
    if not out.exists() and not out.is_symlink():
        os.replace(tmp, out)
        return
    old = temp_sibling(out)
    os.replace(out, old)
    os.replace(tmp, out)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()


def _version() -> str:
    import jaxsft

    return jaxsft.__version__


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit status 2, like every other error here)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m jaxsft.convert",
                description="Convert torchvision/timm ResNet weights into a jaxsft weights "
                            "directory (Orbax checkpoint + jaxsft_weights.json), read back by "
                            "jaxsft.load_weights(DIR, arch).")
    p.add_argument("--arch", required=True, choices=list_models(), metavar="ARCH",
                   help=f"architecture: {', '.join(list_models())}")
    p.add_argument("--source", required=True, metavar="FILE_OR_URL",
                   help="a .pth/.pt/.bin/.safetensors state dict, an https:// or file:// URL, "
                        "torchvision:<arch>.<WEIGHTS> (e.g. torchvision:resnet50.IMAGENET1K_V2)"
                        ", or a directory written by this command")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write")
    p.add_argument("--num-classes", type=int, default=None, metavar="N",
                   help="classes of the head; a count other than the source's re-initialises "
                        "the head (default: keep the source's head)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of a re-initialised head (default: 0)")
    p.add_argument("--force", action="store_true", help="replace DIR if it exists")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="download cache (default: $JAXSFT_CACHE or ~/.cache/jaxsft)")
    p.add_argument("--sha256", default=None, help="expected sha256 of a downloaded file")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: 0 on success; one line on stderr and status 2 on any error."""
    args = _parser().parse_args(argv)
    setup()  # the CLIs' process-wide settings, Orbax's noise after a failed write among them
    try:
        out = convert(args.arch, args.source, args.out, num_classes=args.num_classes,
                      seed=args.seed, force=args.force, cache_dir=args.cache_dir,
                      sha256=args.sha256)
    except (WeightsError, OSError) as e:
        message = " ".join(str(e).split())
        print(f"python -m jaxsft.convert: error: {message}", file=sys.stderr)
        return 2
    print(f"wrote {args.arch} weights to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
