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
    launch = parser.add_argument_group(
        "distributed", "multi-host runs: auto-detected under SLURM, Open MPI and Cloud TPU; "
        "otherwise give all three flags on every process")
    launch.add_argument("--coordinator-address", help="host:port of process 0")
    launch.add_argument("--num-processes", type=int, help="number of processes in the run")
    launch.add_argument("--process-id", type=int, help="this process's index, 0..N-1")
    launch.add_argument("--distributed-timeout", type=int, default=300,
                        help="seconds to wait for the other processes (default: 300)")
    return parser


def given_fields(args: argparse.Namespace) -> set[str]:
    """The config fields set on the command line (the flags' defaults are SUPPRESS)."""
    return {k for k in vars(args) if k in config.FLAT_FIELDS}


def default_recipe(cfg: config.Config, given: set[str]) -> config.Config:
    """Fine-tuning (--weights) without a named --recipe uses auto (jaxsft.recipes)."""
    if "recipe" not in given and cfg.model.weights and cfg.optim.recipe == "full":
        return cfg.replace(recipe="auto")
    return cfg


LAUNCH_FLAGS = ("coordinator_address", "num_processes", "process_id", "distributed_timeout")


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    launch = {k: getattr(args, k) for k in LAUNCH_FLAGS}
    for k in LAUNCH_FLAGS:
        delattr(args, k)
    given = given_fields(args)
    cfg = default_recipe(config.from_args(args), given)  # validated before JAX starts
    from jaxsft import distributed

    distributed.initialize(launch["coordinator_address"], launch["num_processes"],
                           launch["process_id"], timeout_s=launch["distributed_timeout"])
    cli.use_dtype(cfg.model.dtype)
    from jaxsft.trainer import fit

    fit(cfg, given=given)


if __name__ == "__main__":
    cli.run(main, prog=PROG)
