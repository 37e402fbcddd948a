"""Run ``python -m train`` in a subprocess, the way a user does.

Subprocesses inherit the session's persistent XLA compilation cache
(tests/conftest.py), so the runs of one micro config compile their step once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tests.xla_flags import xla_flags

REPO = Path(__file__).resolve().parents[2]

# A micro MoE model (1 layer, width 32, 4 experts) so that runs take seconds.
MICRO = ["--set", "n_layers=1", "--set", "d_model=32", "--set", "n_heads=2", "--set", "n_kv_heads=1",
         "--set", "d_ff=64", "--set", "moe.d_ff=32", "--set", "moe.num_experts=4",
         "--batch-size", "8", "--seq-len", "32", "--eval-batches", "1"]


def train_env(devices: int = 1) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = xla_flags(devices if devices > 1 else None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_PLATFORMS"] = "cpu"
    return env


def start_train(args: list[str], **env_kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "train", *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=train_env(**env_kwargs))


def run_train(args: list[str], timeout: float = 300, **env_kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=timeout, env=train_env(**env_kwargs))


def checkpoint_steps(out: Path) -> list[int]:
    directory = out / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def wait_for_checkpoint(proc: subprocess.Popen, out: Path, after: int, timeout: float = 240) -> int:
    """Poll until a finished checkpoint newer than ``after`` exists; returns its step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        newer = [s for s in checkpoint_steps(out) if s > after]
        if newer:
            return newer[0]
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc={proc.returncode}) before a checkpoint after "
                                 f"step {after}:\n{proc.stderr.read()}")
        time.sleep(0.02)
    raise AssertionError("timed out waiting for a checkpoint")


def micro_overrides() -> tuple[str, ...]:
    return tuple(MICRO[i + 1] for i, flag in enumerate(MICRO) if flag == "--set")


def save_micro_model(path: Path, seed: int) -> Path:
    """A model directory (config.json + model/) of the micro model, as convert writes one.
    Values are drawn with numpy into an abstract model (no initializer compiles)."""
    import jax
    import numpy as np
    from flax import nnx

    import moejax
    from moejax.checkpoint import save_model
    from train.config import apply_overrides

    cfg = apply_overrides(moejax.ModelConfig.preset("tiny"), micro_overrides())
    graphdef, state = nnx.split(nnx.eval_shape(lambda: moejax.Transformer(cfg, rngs=nnx.Rngs(seed))))
    rng = np.random.default_rng(seed)
    values = jax.tree.map(lambda x: jax.numpy.asarray((0.1 * rng.normal(size=x.shape)).astype(x.dtype)),
                          nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, values)
    save_model(path, nnx.merge(graphdef, state), cfg)
    return path
