"""Memory FFN kinds inside the Transformer: aux and MoE bookkeeping, shared value tables,
KV-cache decoding (prefill + single-token extends, ragged prompts, scanned layers) against
the full forward, and `python -m train --preset tiny-mem / tiny-engram`."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import MemoryConfig, MoEConfig, ModelConfig, Transformer
from moejax.config import ConfigError
from moejax.memory import NGramMemory, ProductKeyMemory
from tests.decode_helpers import check_prefill_then_steps, check_ragged_batch
from tests.train.train_cli_helper import run_train

VOCAB = 128
MEMORY = MemoryConfig(num_slots=64, top_k=4, num_heads=2, d_key=8, ngram_orders=(2, 3), ngram_heads=2,
                      ngram_table_rows=256, ngram_d_row=4, ngram_conv_kernel=3)


def config(kinds, **changes) -> ModelConfig:
    moe = MoEConfig(d_model=32, d_ff=32, num_experts=4, top_k=2)
    return ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=len(kinds), n_heads=2, n_kv_heads=1,
                       d_ff=64, moe=moe, memory=MEMORY, ffn_kinds=kinds, max_seq_len=64, **changes)


def build(cfg, seed=0) -> Transformer:
    model = Transformer(cfg, rngs=nnx.Rngs(seed))
    # the convolution starts at zero: give it weights so decoding must carry its window
    for i, mem in enumerate(memory_modules(model, NGramMemory)):
        mem.conv[...] = 0.5 * jax.random.normal(jax.random.key(i), mem.conv.shape)
    return model


def memory_modules(model, cls):
    return [m for _, m in nnx.iter_graph(model) if isinstance(m, cls)]


def test_every_memory_kind_runs_in_a_model_and_moe_bookkeeping_follows():
    cfg = config(("engram+dense", "pkm+moe", "engram+moe", "pkm"))
    model = build(cfg)
    assert cfg.num_moe_layers == 2 and len(model.moe_layers) == 2
    logits, aux = nnx.jit(lambda m, t: m(t))(model, jnp.ones((2, 6), jnp.int32))
    assert logits.shape == (2, 6, VOCAB) and bool(jnp.all(jnp.isfinite(logits)))
    assert aux["expert_load"].shape == (2, 4) and float(aux["router_loss"]) > 0
    assert model.token_lookback == 2


def test_shared_value_table_is_one_parameter():
    cfg = config(("pkm", "dense", "pkm"), )
    shared = cfg.replace(memory=MEMORY.replace(share_values=True))
    count = lambda c: len(jax.tree.leaves(nnx.state(build(c), nnx.Param)))  # noqa: E731
    assert count(cfg) - count(shared) == 1
    rngs = nnx.Rngs(0)   # two models from one Rngs: each has its own table
    model, other = Transformer(shared, rngs=rngs), Transformer(shared, rngs=rngs)
    a, b = memory_modules(model, ProductKeyMemory)
    assert a.values is b.values
    assert all(m.values is not a.values for m in memory_modules(other, ProductKeyMemory))
    with pytest.raises(ConfigError, match=r"MemoryConfig\.share_values"):
        build(shared.replace(scan_layers=True))


@pytest.mark.parametrize("kinds, scan", [
    (("engram", "pkm+moe", "engram+moe"), False),
    (("engram", "engram", "pkm", "pkm"), True)])     # two scanned groups of memory layers
def test_decode_matches_the_full_forward(kinds, scan):
    model = build(config(kinds, scan_layers=scan))
    check_prefill_then_steps(model, VOCAB, n=5, m=3)
    if not scan:   # prompts of different lengths: the conv window keeps each row's own tokens
        check_ragged_batch(model, VOCAB, lengths=(5, 1, 3), steps=2)


def test_a_reused_cache_row_decodes_like_a_fresh_one():
    """Serving reuses a row for a new request by zeroing its length (and token history) only:
    the Engram conv window left by the old request must not leak into the new one."""
    model = build(config(("engram", "engram+moe")))
    extend = nnx.jit(lambda m, t, c: m.extend(t, c))
    old, new = jnp.arange(3, 9, dtype=jnp.int32)[None], jnp.arange(40, 45, dtype=jnp.int32)[None]
    _, used = extend(model, old, model.init_cache(1, 16))
    reused = dataclasses.replace(used, lengths_B=jnp.zeros_like(used.lengths_B),
                                 tokens_BT=jnp.full_like(used.tokens_BT, -1))
    want, _ = extend(model, new, model.init_cache(1, 16))
    got, _ = extend(model, new, reused)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_scanned_engram_layers_hash_with_their_own_multipliers():
    model = build(config(("engram", "engram"), scan_layers=True))
    (mem,) = memory_modules(model, NGramMemory)
    mult = np.asarray(mem.multipliers[...])
    assert mult.shape[0] == 2 and (mult[0] != mult[1]).all() and (mult % 2 == 1).all()


MICRO = ["--set", "d_model=32", "--set", "n_heads=2", "--set", "n_kv_heads=1", "--set", "d_ff=64",
         "--set", "moe.d_ff=32", "--set", "moe.num_experts=4", "--batch-size", "8", "--seq-len", "32",
         "--eval-batches", "1", "--steps", "3", "--log-every", "1", "--no-tensorboard", "--no-plot"]


@pytest.mark.parametrize("preset, memory", [   # 2 of the 4 layers, the memory one kept
    ("tiny-mem", ['ffn_kinds=["pkm","moe"]', "memory.num_slots=256", "memory.top_k=8", "memory.d_key=16"]),
    ("tiny-engram", ['ffn_kinds=["moe","engram+moe"]', "memory.ngram_table_rows=4096",
                     "memory.ngram_d_row=8"])])
def test_presets_train_from_the_command_line(tmp_path, preset, memory):
    sets = [arg for m in ["n_layers=2", *memory] for arg in ("--set", m)]
    result = run_train(["--preset", preset, "--out", str(tmp_path / preset), *MICRO, *sets], timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / preset / "config.json").exists()
    assert '"memory"' in (tmp_path / preset / "config.json").read_text()
