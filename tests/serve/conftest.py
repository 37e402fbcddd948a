"""Shared fixtures: a micro MoE model, its model directory and its serving checkpoint."""

from __future__ import annotations

import pytest
from flax import nnx

import moejax
from moejax.checkpoint import save_model
from serve.export import export


def micro_config(**overrides) -> moejax.ModelConfig:
    """2 layers, width 32, 4 experts top-2, byte vocabulary: compiles and runs in seconds."""
    moe = moejax.MoEConfig(d_model=32, d_ff=32, num_experts=4, top_k=2)
    cfg = moejax.ModelConfig(name="micro", vocab_size=256, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1,
                             d_ff=64, moe=moe, max_seq_len=64)
    return cfg.replace(**overrides) if overrides else cfg


@pytest.fixture(scope="session")
def micro_model():
    cfg = micro_config()
    return moejax.Transformer(cfg, rngs=nnx.Rngs(0)), cfg


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory, micro_model):
    model, cfg = micro_model
    path = tmp_path_factory.mktemp("micro_run") / "run"
    save_model(path, model, cfg)
    return path


@pytest.fixture(scope="session")
def micro_serving(tmp_path_factory, micro_run):
    out = tmp_path_factory.mktemp("micro_serving") / "serving"
    export(micro_run, out)
    return out
