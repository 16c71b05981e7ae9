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


LAUNCH_FLAGS = ("coordinator_address", "num_processes", "process_id", "distributed_timeout")


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    launch = {k: getattr(args, k) for k in LAUNCH_FLAGS}
    for k in LAUNCH_FLAGS:
        delattr(args, k)
    given = {k for k in vars(args) if k in config.FLAT_FIELDS}
    cfg = config.from_args(args)  # validated before JAX starts
    if "recipe" not in given and cfg.model.weights and cfg.optim.recipe == "full":
        cfg = cfg.replace(recipe="auto")  # fine-tuning: the rule, unless a recipe is named
    from jaxsft import distributed

    distributed.initialize(launch["coordinator_address"], launch["num_processes"],
                           launch["process_id"], timeout_s=launch["distributed_timeout"])
    cli.use_dtype(cfg.model.dtype)
    import jax

    from jaxsft import data, recipes
    from jaxsft.trainer import fit

    cfg, chosen = recipes.resolve(cfg, data.dataset_info(cfg.data), given)
    if chosen and jax.process_index() == 0:
        print(chosen, flush=True)
    fit(cfg)


if __name__ == "__main__":
    cli.run(main, prog=PROG)
