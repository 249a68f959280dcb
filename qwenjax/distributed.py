"""Multi-host start-up: `jax.distributed` from the environment, or an explicit coordinator.

JAX detects TPU pod slices, SLURM, Open MPI and GKE by itself; elsewhere (a hand-made cluster, the
local multi-process launcher) pass the coordinator address, the process count and this process's
id, as flags or as QWENJAX_COORDINATOR / QWENJAX_NUM_PROCESSES / QWENJAX_PROCESS_ID.
"""

from __future__ import annotations

import dataclasses
import os

import jax


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How this process joins the job. `auto` asks JAX to detect the cluster."""

    mode: str = "auto"  # "auto" | "single" | "explicit"
    coordinator: str | None = None  # host:port of process 0
    num_processes: int | None = None
    process_id: int | None = None


def _from_env(config: DistributedConfig) -> DistributedConfig:
    env = os.environ
    if config.coordinator is None and "QWENJAX_COORDINATOR" in env:
        return DistributedConfig(
            mode="explicit",
            coordinator=env["QWENJAX_COORDINATOR"],
            num_processes=int(env["QWENJAX_NUM_PROCESSES"]),
            process_id=int(env["QWENJAX_PROCESS_ID"]),
        )
    return config


# Environment variables that mean "JAX can find the other processes by itself".
CLUSTER_MARKERS = (
    "SLURM_JOB_ID",
    "OMPI_COMM_WORLD_SIZE",
    "TPU_WORKER_HOSTNAMES",
    "MEGASCALE_COORDINATOR_ADDRESS",
    "JOB_COMPLETION_INDEX",
)


def _cluster_detected() -> bool:
    env = os.environ
    return any(k in env for k in CLUSTER_MARKERS)


def initialize(config: DistributedConfig = DistributedConfig()) -> None:
    """Join the multi-process job (a no-op for a single process).

    Call before any other JAX call. On CPU, cross-process collectives use gloo.
    """
    config = _from_env(config)
    if config.mode == "single":
        return
    if config.mode == "explicit" or config.coordinator is not None:
        if config.num_processes is None or config.process_id is None:
            raise ValueError("explicit distributed start needs num_processes and process_id")
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=config.coordinator,
            num_processes=config.num_processes,
            process_id=config.process_id,
        )
        return
    if config.mode != "auto":
        raise ValueError(f"distributed mode {config.mode!r}: choose auto, single or explicit")
    if _cluster_detected():
        jax.distributed.initialize()  # JAX reads the cluster's own environment


def is_main_process() -> bool:
    """Only process 0 writes logs, metrics and the human-facing console output."""
    return jax.process_index() == 0
