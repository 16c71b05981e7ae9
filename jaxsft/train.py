"""`python -m jaxsft.train`: fine-tune a ResNet. Every config field is a flag; see --help."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from jaxsft import cli, config

PROG = "python -m jaxsft.train"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Fine-tune a (pretrained) ResNet with cross-entropy and SGD-momentum on "
                    "every local device. Rerunning the same command in the same --workdir "
                    "resumes where it stopped.")
    config.add_flags(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    cfg = config.from_args(build_parser().parse_args(argv))
    from jaxsft.trainer import fit  # after validation: a bad flag fails before JAX starts

    fit(cfg)


if __name__ == "__main__":
    cli.run(main, prog=PROG)
