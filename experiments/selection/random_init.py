"""Seconds `jaxsft.select` takes to initialise an `arch=random` candidate for data sets of
several class counts, each in a fresh process sharing one new, empty compilation cache: the
first count compiles the initialisation; whether the next ones load it or compile again is
what this measures.

    python -m experiments.selection.random_init [--arch resnet18] [CLASSES ...]  (default 6 10)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time


def initialise(arch: str, classes: int) -> float:
    """Seconds for select's random candidate, in this process, for a `classes`-class set."""
    import jax

    from jaxsft import select
    from jaxsft.process import setup

    setup()
    started = time.perf_counter()
    _, variables, _ = select._load(select.Candidate(arch, select.RANDOM), classes, 32, 0)
    jax.block_until_ready(variables)
    return time.perf_counter() - started


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("classes", nargs="*", type=int, default=[6, 10])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child process
    args = p.parse_args(argv)
    if args.one:
        print(f"{initialise(args.arch, args.classes[0]):.2f}")
        return
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "JAXSFT_CACHE": cache, "JAXSFT_ONEDNN": "off"}
        env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the empty cache, not one configured
        for k in args.classes:
            out = subprocess.run([sys.executable, "-m", "experiments.selection.random_init",
                                  "--one", "--arch", args.arch, str(k)], env=env, check=True,
                                 capture_output=True, text=True).stdout.split()[-1]
            print(f"{args.arch}=random for {k} classes: {out} s", flush=True)


if __name__ == "__main__":
    main()
