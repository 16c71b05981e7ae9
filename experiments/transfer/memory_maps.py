"""The process's memory maps after each of a few benchmark cells, with and without
`jaxsft.compilation_cache.release_compiled()` between them (Linux: /proc/self/maps).

    python -m experiments.transfer.memory_maps [--cells 3] [--workdir runs/transfer]

The same cell (the seed's loop, digits, 1 label per class, seed 0) runs `--cells` times in
one process, then as many times again with the release after each; every cell's top-1 is
printed too, so that the release is seen to change no result. About 1 minute with the
compilation cache warm.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def maps() -> int:
    with open(f"/proc/{os.getpid()}/maps") as f:
        return sum(1 for _ in f)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=3)
    p.add_argument("--workdir", default="runs/transfer")
    args = p.parse_args(argv)

    os.environ["JAXSFT_ONEDNN"] = "off"  # as the benchmark runs its cells
    from jaxsft.process import setup

    setup()
    from experiments.transfer.run import PRETRAIN, run_cell, source_weights
    from jaxsft.compilation_cache import release_compiled

    workdir = Path(args.workdir)
    weights = source_weights("resnet18", workdir, steps=PRETRAIN["steps"],
                             train_per_face=PRETRAIN["train_per_face"])
    print(f"before any cell: {maps()} maps", flush=True)
    for release in (False, True):
        for i in range(args.cells):
            row = run_cell("digits", "resnet18", "seed", 1, 0, weights=weights,
                           workdir=workdir / "memory_maps", steps=None)
            if release:
                release_compiled()
            print(f"{'with' if release else 'without'} release, cell {i + 1}: {maps()} maps, "
                  f"top-1 {row['top1']}, {row['wall_s']} s", flush=True)


if __name__ == "__main__":
    main()
