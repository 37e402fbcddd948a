"""NGramMemory (Engram): hashes against a pure-Python reference and inside their tables,
causality, and chunked decoding (prev ids + conv window) against the full sequence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.config import ConfigError, MemoryConfig
from moejax.memory import NGramMemory, hash_multipliers, ngram_indices, ngram_lookup, table_layout

CFG = MemoryConfig(ngram_orders=(2, 3), ngram_heads=3, ngram_table_rows=600, ngram_d_row=4,
                   ngram_conv_kernel=3)
D, V = 16, 256
MASK = 2**32 - 1


def multipliers(cfg, seed):
    return hash_multipliers(jax.random.key(seed), cfg)


def python_rows(tokens, prev, cfg, mult):
    """The hash of ngram_indices with Python integers (no wrapping types), masked to 32 bits."""
    mult = np.asarray(mult).astype(np.int64)
    sizes, offsets, _ = table_layout(cfg)
    look = max(cfg.ngram_orders) - 1
    out = np.zeros(tokens.shape + (len(cfg.ngram_orders) * cfg.ngram_heads,), np.int64)
    for b in range(tokens.shape[0]):
        ids = [int(i) for i in prev[b, prev.shape[1] - look:]] + [int(i) for i in tokens[b]]
        for t in range(tokens.shape[1]):
            for o, n in enumerate(cfg.ngram_orders):
                for h in range(cfg.ngram_heads):
                    x = 0
                    for i in range(n):
                        x ^= ((ids[look + t - i] & MASK) * int(mult[o, h, i])) & MASK
                    x ^= x >> 15
                    x = (x * 0x9E3779B1) & MASK
                    x ^= x >> 13
                    out[b, t, o * cfg.ngram_heads + h] = offsets[o, h] + x % sizes[o, h]
    return out


ADVERSARIAL = np.array([[0, V - 1, 2**31 - 1, 0, 0, -1, 2**30, 7],
                        [V - 1, V - 1, V - 1, 1, 2**31 - 2, 0, 12345, V]], np.int32)


@pytest.mark.parametrize("layer", [0, 5])
def test_hash_equals_python_reference_and_stays_in_each_heads_table(layer):
    tokens = np.concatenate([ADVERSARIAL, np.random.default_rng(layer).integers(0, 2**31 - 1, (2, 24))],
                            axis=1).astype(np.int32)
    prev = np.array([[-1, -1, -1], [2**31 - 1, 0, V - 1]], np.int32)
    mult = multipliers(CFG, layer)
    assert mult.dtype == jnp.uint32 and bool(jnp.all(mult % 2 == 1))
    rows = np.asarray(jax.jit(ngram_indices, static_argnums=3)(tokens, prev, mult, CFG))
    np.testing.assert_array_equal(rows, python_rows(tokens, prev, CFG, mult))
    sizes, offsets, total = table_layout(CFG)
    lo, hi = offsets.reshape(-1), (offsets + sizes).reshape(-1)
    assert rows.dtype == np.int32
    assert ((rows >= lo) & (rows < hi)).all() and hi[-1] == total
    # every head spreads over its table (not stuck in a corner)
    assert all(len(np.unique(rows[..., m])) > 20 for m in range(rows.shape[-1]))
    assert len(set(sizes.reshape(-1).tolist())) == sizes.size   # distinct primes


def test_layers_and_hash_seeds_hash_differently_and_lookup_concatenates():
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, V, (2, 9)), jnp.int32)
    r0 = ngram_indices(tokens, None, multipliers(CFG, 0), CFG)
    r1 = ngram_indices(tokens, None, multipliers(CFG, 1), CFG)
    assert (np.asarray(r0) != np.asarray(r1)).mean() > 0.9
    # hash_seed is a second seed: same model seed, other multipliers (it used to be ignored)
    reseeded = hash_multipliers(jax.random.key(0), CFG.replace(hash_seed=1))
    assert (np.asarray(reseeded) != np.asarray(multipliers(CFG, 0))).all()
    table = jnp.arange(table_layout(CFG)[2] * 4, dtype=jnp.float32).reshape(-1, 4)
    e = ngram_lookup(table, r0)
    np.testing.assert_array_equal(np.asarray(e[1, 3, 8:12]), np.asarray(table[r0[1, 3, 2]]))
    assert e.shape == (2, 9, 6 * 4)


def build(cfg=CFG, seed=1):
    mem = NGramMemory(cfg, D, rngs=nnx.Rngs(seed), vocab_size=V)
    # a non-zero conv (it starts at zero), so the tests see the window and its causality
    mem.conv[...] = jax.random.normal(jax.random.key(1), mem.conv.shape)
    return mem


@nnx.jit
def apply(mem, x, tokens, prev=None, state=None, valid=None):
    return mem.apply(x, tokens, prev, state, valid)


def test_output_at_t_depends_only_on_tokens_up_to_t():
    mem = build()
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, V, (2, 12)).astype(np.int32)
    x = jax.random.normal(jax.random.key(2), (2, 12, D))
    y, _ = apply(mem, x, tokens)
    assert float(jnp.abs(y).max()) > 0
    for t in (0, 4, 10):
        later_tokens = tokens.copy()
        later_tokens[:, t + 1:] = rng.integers(0, V, later_tokens[:, t + 1:].shape)
        later_x = x.at[:, t + 1:].set(jax.random.normal(jax.random.key(t), x[:, t + 1:].shape))
        y2, _ = apply(mem, later_x, later_tokens)
        np.testing.assert_array_equal(np.asarray(y2[:, :t + 1]), np.asarray(y[:, :t + 1]))
        changed = tokens.copy()
        changed[:, t] = (changed[:, t] + 1) % V    # the token at t itself does matter
        y3, _ = apply(mem, x, changed)
        assert float(jnp.abs(y3[:, t] - y[:, t]).min()) > 0


def test_chunked_decoding_with_state_equals_the_full_sequence():
    mem = build()
    tokens = np.random.default_rng(1).integers(0, V, (2, 11)).astype(np.int32)
    x = jax.random.normal(jax.random.key(3), (2, 11, D))
    y_full, _ = apply(mem, x, tokens)
    look = mem.token_lookback
    state = mem.init_state(2, 11)
    seen = np.full((2, look), -1, np.int32)
    outs = []
    for lo, hi in ((0, 4), (4, 5), (5, 6), (6, 11)):   # a prefill, single tokens, a chunk
        y, state = apply(mem, x[:, lo:hi], tokens[:, lo:hi], seen[:, -look:], state)
        outs.append(y)
        seen = np.concatenate([seen, tokens[:, lo:hi]], axis=1)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(y_full),
                               rtol=1e-5, atol=1e-6)


def test_padded_chunk_keeps_only_valid_positions_in_the_window():
    mem = build()
    tokens = np.random.default_rng(2).integers(0, V, (2, 8)).astype(np.int32)
    x = jax.random.normal(jax.random.key(4), (2, 8, D))
    y_full, _ = apply(mem, x, tokens)
    # row 0 takes 5 tokens in the first call, row 1 takes 3 (the rest is padding)
    lengths = np.array([5, 3])
    valid = np.arange(6)[None, :] < lengths[:, None]
    y_a, state = apply(mem, x[:, :6], tokens[:, :6], None, mem.init_state(2, 8), jnp.asarray(valid))
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(np.asarray(y_a[b, :n]), np.asarray(y_full[b, :n]), rtol=1e-5, atol=1e-6)
        prev = tokens[b:b + 1, n - mem.token_lookback:n]
        y_b, _ = apply(mem, x[b:b + 1, n:n + 1], tokens[b:b + 1, n:n + 1], prev, state[b:b + 1])
        np.testing.assert_allclose(np.asarray(y_b[0, 0]), np.asarray(y_full[b, n]), rtol=1e-5, atol=1e-6)


def test_casefold_id_map_and_its_vocabulary_check():
    cfg = CFG.replace(ngram_id_map="casefold_bytes")
    mem = NGramMemory(cfg, D, rngs=nnx.Rngs(0), vocab_size=V)
    upper = jnp.asarray([[ord(c) for c in "Hello World"]], jnp.int32)
    lower = jnp.asarray([[ord(c) for c in "hello world"]], jnp.int32)
    np.testing.assert_array_equal(np.asarray(mem.rows(upper)), np.asarray(mem.rows(lower)))
    assert (np.asarray(build(cfg, 0).rows(upper)) != np.asarray(build(CFG, 0).rows(upper))).any()
    with pytest.raises(ConfigError, match=r"MemoryConfig\.ngram_id_map"):
        NGramMemory(cfg, D, rngs=nnx.Rngs(0), vocab_size=1024)
