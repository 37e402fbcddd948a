"""Process-level set-up: the distributed runtime, the mesh, and stop signals."""

from __future__ import annotations

import os
import signal

import jax
from jax.sharding import Mesh

from moejax import sharding
from train.config import TrainError


def _env_int(name: str) -> int:
    try:
        return int(os.environ.get(name, "0"))
    except ValueError:
        return 0


def multi_host_environment() -> bool:
    """True when the environment describes more than one process (JAX, SLURM, MPI, TPU pod)."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS") or _env_int("JAX_NUM_PROCESSES") > 1:
        return True
    if "SLURM_JOB_ID" in os.environ and _env_int("SLURM_NTASKS") > 1:
        return True
    if _env_int("OMPI_COMM_WORLD_SIZE") > 1:
        return True
    hosts = os.environ.get("TPU_PROCESS_ADDRESSES") or os.environ.get("TPU_WORKER_HOSTNAMES") or ""
    return "," in hosts


def maybe_initialize_distributed() -> None:
    """``jax.distributed.initialize()`` when the environment says this is a multi-host run."""
    if not multi_host_environment():
        return
    kwargs = {}
    if _env_int("JAX_NUM_PROCESSES") > 1:
        kwargs = dict(num_processes=_env_int("JAX_NUM_PROCESSES"), process_id=_env_int("JAX_PROCESS_ID"))
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as err:
        raise TrainError(f"multi-host environment detected but jax.distributed.initialize() "
                         f"failed: {err}") from None


def build_mesh(spec: str | None) -> Mesh:
    """``--mesh`` -> Mesh over all devices; no spec = pure data parallelism."""
    if spec is None:
        spec = f"data={jax.device_count()}"
    try:
        return sharding.make_mesh(spec)
    except ValueError as err:
        raise TrainError(f"--mesh: {err}") from None


class StopSignal:
    """Turns SIGTERM (preemption) and SIGINT into a request the loop honours between
    steps: it saves a checkpoint, then exits. A second SIGINT interrupts at once."""

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def __enter__(self) -> "StopSignal":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
