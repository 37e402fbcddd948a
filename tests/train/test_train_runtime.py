"""When the run is multi-host: the environment decides, and only then is
``jax.distributed.initialize()`` called."""

from __future__ import annotations

import pytest

from train import runtime

CLUSTER_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "SLURM_JOB_ID", "SLURM_NTASKS",
                "OMPI_COMM_WORLD_SIZE", "TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES")


@pytest.mark.parametrize("env,multi", [
    ({}, False),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True),
    ({"JAX_NUM_PROCESSES": "1"}, False),
    ({"JAX_NUM_PROCESSES": "4"}, True),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, False),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}, True),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, True),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, False),
    ({"TPU_WORKER_HOSTNAMES": "t1,t2,t3,t4"}, True),
])
def test_multi_host_environment(monkeypatch, env, multi):
    for name in CLUSTER_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    calls = []
    monkeypatch.setattr(runtime.jax.distributed, "initialize", lambda **kw: calls.append(kw))
    assert runtime.multi_host_environment() is multi
    runtime.maybe_initialize_distributed()
    assert len(calls) == int(multi)
    if env.get("JAX_NUM_PROCESSES") == "4":
        assert calls[0] == {"num_processes": 4, "process_id": 0}
