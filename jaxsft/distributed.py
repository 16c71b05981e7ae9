"""Multi-host launches through JAX's own multi-controller runtime (`jax.distributed`).

Every process runs the same command; JAX's cluster detection reads what SLURM, Open MPI or
Cloud TPU set, or the explicit `--coordinator-address/--num-processes/--process-id` flags.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

from jaxsft.config import ConfigError


def launched_as_cluster(env: Mapping[str, str] = os.environ) -> bool:
    """Whether the environment describes a multi-process launch JAX can detect by itself."""
    def more_than_one(name: str) -> bool:
        return env.get(name, "1").isdigit() and int(env.get(name, "1")) > 1

    tpu_hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    return (more_than_one("SLURM_NTASKS") or more_than_one("OMPI_COMM_WORLD_SIZE")
            or len(tpu_hosts) > 1 or "JAX_COORDINATOR_ADDRESS" in env)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, timeout_s: int = 300,
               env: Mapping[str, str] = os.environ) -> bool:
    """Joins the distributed run if this is one; returns whether it did.

    Must run before anything touches the devices. On the CPU, collectives go through gloo.
    """
    explicit = [coordinator_address, num_processes, process_id]
    if any(v is not None for v in explicit) and any(v is None for v in explicit):
        raise ConfigError("give all of --coordinator-address, --num-processes and "
                          "--process-id, or none of them (auto-detection)")
    if coordinator_address is None and not launched_as_cluster(env):
        return False
    if coordinator_address is not None and process_id != 0:
        # JAX aborts the whole process (no exception) when the coordinator cannot be reached,
        # so check first that process 0 is listening, within the same bounded time.
        _wait_for_coordinator(coordinator_address, timeout_s)
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   initialization_timeout=timeout_s)
    except Exception as e:  # noqa: BLE001 - JAX raises several types; the cause is reported
        where = coordinator_address or "the auto-detected coordinator"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"could not join the distributed run at {where} within {timeout_s}s ({reason}); "
            "check --coordinator-address and that process 0 is running") from None
    return True


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--coordinator-address {address!r} must be host:port")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise ConfigError(
                    f"could not reach the coordinator at {address} within {timeout_s:g}s "
                    f"({e.strerror or e}); check --coordinator-address and that process 0 "
                    "is running") from None
            time.sleep(0.25)
