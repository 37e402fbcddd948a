"""Decoding with a cache reproduces the full forward, for every preset (see decode_helpers)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import ModelConfig, Transformer
from moejax.attention import MLAttention
from moejax.decode_cache import valid_mask
from moejax.layers import FFN_KINDS, LayerAux, register_ffn_kind
from tests.decode_helpers import (TOL, assert_dropless, check_prefill_then_steps, check_ragged_batch,
                                  decode_in_chunks, extend, extend_all, forward,
                                  rel_err)

VOCAB = 128


def small(name: str, **changes) -> ModelConfig:
    """The preset with 2 layers and a small vocabulary; attention kind and features kept."""
    cfg = ModelConfig.preset(name)
    kinds = changes.pop("ffn_kinds", cfg.ffn_kinds[-2:])
    cfg = cfg.replace(n_layers=2, ffn_kinds=kinds, vocab_size=VOCAB, **changes)
    assert_dropless(cfg)
    return cfg


def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
    return Transformer(cfg, rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("name", ModelConfig.preset_names())
def test_prefill_then_single_steps_match_the_full_forward(name):
    model = build(small(name))
    check_prefill_then_steps(model, VOCAB)


@pytest.mark.parametrize("name", ["tiny", "deepseek-mini"])    # GQA and MLA
def test_ragged_prompts_match_each_prompt_alone(name):
    check_ragged_batch(build(small(name)), VOCAB)


@pytest.mark.parametrize("name", ["qwen3-moe-mini", "deepseek-mini"])
def test_chunked_prefill_matches_the_full_forward(name):
    model = build(small(name))
    tokens = np.random.default_rng(2).integers(0, VOCAB, size=(2, 8)).astype(np.int32)
    want = np.asarray(forward(model, jnp.asarray(tokens)))
    assert rel_err(decode_in_chunks(model, tokens, [2, 5, 1]), want) <= TOL


def test_gqa_features_bias_yarn_in_decode():
    """attention_bias and YaRN (no preset has them) through the same check."""
    from moejax.config import YarnConfig
    cfg = small("qwen3-moe-mini", attention_bias=True,
                rope_yarn=YarnConfig(factor=4.0, original_max_position_embeddings=4, attention_factor=1.2))
    model = build(cfg)
    pure = nnx.to_pure_dict(nnx.state(model))
    rng = np.random.default_rng(0)
    for layer in pure["layers"].values():   # biases start at zero: make them count
        for key in ("bq", "bk", "bv"):
            layer["attn"][key] = jnp.asarray(rng.normal(size=layer["attn"][key].shape), jnp.float32)
    nnx.update(model, pure)
    check_prefill_then_steps(model, VOCAB)


def test_mla_absorbed_and_expanded_decoding_agree(monkeypatch):
    model = build(small("deepseek-mini"))
    tokens = np.random.default_rng(3).integers(0, VOCAB, size=(2, 8)).astype(np.int32)
    want = np.asarray(forward(model, jnp.asarray(tokens)))
    for absorbed in (True, False):
        monkeypatch.setattr(MLAttention, "decode_absorbed", absorbed)
        fresh = jax.jit(lambda m, t, c: m.extend(t, c))   # a class attribute is not in the jit key
        got = decode_in_chunks(model, tokens, [5, 1, 1, 1], extend_fn=fresh)
        assert rel_err(got, want) <= TOL, (absorbed, rel_err(got, want))


def test_mla_cache_holds_only_the_latent_and_rope_key():
    cfg = small("deepseek-mini")
    cache = build(cfg).init_cache(3, 16)
    mla = cfg.mla
    for layer in cache.layers:
        assert {k: v.shape for k, v in layer["attn"].items()} == {
            "c": (3, 16, mla.kv_lora_rank), "k_rope": (3, 16, mla.qk_rope_head_dim)}


def test_extend_compiles_once_per_chunk_length():
    model = build(small("tiny"))
    traces = []

    @jax.jit
    def step(model, tokens, cache):
        traces.append(tokens.shape)
        return model.extend(tokens, cache)
    cache = model.init_cache(2, 8)
    _, cache = step(model, jnp.zeros((2, 3), jnp.int32), cache)
    for i in range(4):
        _, cache = step(model, jnp.full((2, 1), i, jnp.int32), cache)
    assert traces == [(2, 3), (2, 1)]
    np.testing.assert_array_equal(cache.lengths_B, [7, 7])


def test_bad_sizes_are_clear_errors():
    model = build(small("tiny"))
    with pytest.raises(ValueError, match="max_len must be an int in"):
        model.init_cache(1, model.cfg.max_seq_len + 1)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        model.init_cache(True, 4)                          # a bool is not a batch of one
    assert model.init_cache(np.int64(2), np.int32(4)).tokens_BT.shape == (2, 4)   # numpy sizes
    cache = model.init_cache(2, 4)
    _, cache = model.extend(jnp.zeros((2, 3), jnp.int32), cache)
    with pytest.raises(ValueError, match="row 0 holds 3 tokens and gets 2 more, past the cache's max_len=4"):
        model.extend(jnp.zeros((2, 2), jnp.int32), cache)
    with pytest.raises(ValueError, match="lengths_B must have shape"):
        model.extend(jnp.zeros((2, 1), jnp.int32), cache, jnp.ones((3,), jnp.int32))
    with pytest.raises(ValueError, match=r"tokens_BS must be \[batch, seq\], got shape \(3,\)"):
        model.extend(jnp.zeros((3,), jnp.int32), cache)     # was an unpacking error
    for bad in (jnp.asarray([1.7, 1.0]), jnp.asarray([True, False])):   # were cast to 1 and 1, 0
        with pytest.raises(TypeError, match="lengths_B must hold integer counts"):
            model.extend(jnp.zeros((2, 1), jnp.int32), cache, bad)


def test_lengths_outside_the_chunk_are_refused_or_clipped_under_jit():
    """lengths_B counts the real tokens among the S given: outside [0, S] the cache would
    count tokens it never received (or lose some)."""
    for lengths in ([4, 1], [-1, 2]):   # (what extend checks first, before any layer runs)
        with pytest.raises(ValueError, match=r"lengths_B\[0\]=-?\d is outside \[0, 3\]"):
            valid_mask(jnp.asarray(lengths, jnp.int32), 2, 3)
    # under jit the values cannot be checked: clipped, so the count matches what was written
    valid, added = jax.jit(lambda n: valid_mask(n, 2, 3))(jnp.asarray([5, -2], jnp.int32))
    np.testing.assert_array_equal(added, [3, 0])
    np.testing.assert_array_equal(valid, [[True] * 3, [False] * 3])


def test_jitted_extend_past_max_len_gives_nan_logits_not_garbage():
    """Under jit check_room cannot raise: tokens that do not fit are dropped from the cache,
    so their logits (and every later step's) are NaN; the tokens that fit are unchanged."""
    model = build(small("dense-tiny"))
    tokens = np.random.default_rng(5).integers(0, VOCAB, size=(2, 8)).astype(np.int32)
    want = np.asarray(forward(model, jnp.asarray(tokens)))
    cache = model.init_cache(2, 7)
    first, cache = extend(model, jnp.asarray(tokens[:, :5]), cache, jnp.asarray([5, 3], jnp.int32))
    step, cache = extend(model, jnp.asarray(tokens[:, 5:8]), cache, jnp.asarray([3, 3], jnp.int32))
    assert rel_err(step[0, :2], want[0, 5:7]) <= TOL         # positions 5, 6 fit in 7 slots
    assert np.isnan(np.asarray(step[0, 2])).all()             # position 7 does not
    assert np.isfinite(np.asarray(step[1])).all()             # row 1: 3 + 3 tokens fit
    late, _ = extend(model, jnp.asarray(tokens[:, :3]), cache, jnp.asarray([1, 1], jnp.int32))
    assert np.isnan(np.asarray(late[0, 0])).all() and np.isfinite(np.asarray(late[1, 0])).all()


@pytest.mark.parametrize("name", ["tiny", "deepseek-mini"])
def test_out_of_vocab_token_at_the_end_leaves_earlier_logits_unchanged(name):
    """An id past the vocabulary embeds as NaN; attention must keep it out of earlier positions."""
    model = build(small(name))
    tokens = np.random.default_rng(4).integers(0, VOCAB, size=(2, 8)).astype(np.int32)
    clean = np.asarray(forward(model, jnp.asarray(tokens)))
    bad = tokens.copy()
    bad[:, -1] = VOCAB + 7
    got = np.asarray(forward(model, jnp.asarray(bad)))
    assert np.isfinite(got[:, :-1]).all()
    np.testing.assert_allclose(got[:, :-1], clean[:, :-1], rtol=1e-6, atol=1e-6)
    # the same through the cache: the bad token is the last one written
    cache = model.init_cache(2, 10)
    _, cache = extend_all(model, jnp.asarray(bad[:, :5]), cache)
    for i in (5, 6):
        _, cache = extend_all(model, jnp.asarray(bad[:, i:i + 1]), cache)
    step, _ = extend_all(model, jnp.asarray(bad[:, 7:]), cache)
    assert not np.isfinite(np.asarray(step)).all()   # the bad position itself is NaN, as it should be


# ------------------------------------------------- FFN decode state and token look-back

class CountingFFN(nnx.Module):
    """A stateful toy kind: y = 0; state counts real tokens and keeps the look-back ids."""

    token_lookback = 2

    def __init__(self, cfg, layer, *, rngs):
        del cfg, layer, rngs

    def init_state(self, batch_size, max_len):
        return {"count": jnp.zeros((batch_size,), jnp.int32),
                "prev": jnp.full((batch_size, self.token_lookback), -2, jnp.int32)}

    def __call__(self, x_BSD, ctx):
        if ctx.state is not None:
            valid = ctx.valid_BS if ctx.valid_BS is not None else jnp.ones(ctx.tokens_BS.shape, bool)
            ctx.new_state = {"count": ctx.state["count"] + valid.sum(axis=1, dtype=jnp.int32),
                             "prev": ctx.prev_tokens_BN}
        return jnp.zeros_like(x_BSD), LayerAux()


@pytest.fixture
def counting_kind():
    register_ffn_kind("test-counting", CountingFFN)
    yield "test-counting"
    FFN_KINDS.pop("test-counting")


@pytest.mark.parametrize("scan", [False, True])
def test_ffn_decode_state_and_lookback_reach_the_kind(counting_kind, scan):
    cfg = small("dense-tiny", ffn_kinds=("dense", counting_kind), scan_layers=scan)
    model = build(cfg)
    assert model.token_lookback == 2
    cache = model.init_cache(2, 8)
    _, cache = model.extend(jnp.asarray([[5, 6, 7], [8, 9, 0]], jnp.int32), cache,
                            jnp.asarray([3, 1], jnp.int32))
    _, cache = model.extend(jnp.asarray([[1], [2]], jnp.int32), cache)
    state = cache.layers[-1]["ffn"]
    if scan:
        state = jax.tree.map(lambda a: a[-1], state)
    np.testing.assert_array_equal(state["count"], [4, 2])
    np.testing.assert_array_equal(state["prev"], [[6, 7], [-1, 8]])   # ids before the last call
    np.testing.assert_array_equal(cache.tokens_BT[:, :4], [[5, 6, 7, 1], [8, 2, -1, -1]])
