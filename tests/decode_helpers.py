"""Shared by the decode tests: jitted full forward / extend, and the comparisons against it.

The reference is always one full causal forward over the whole sequence;
decoding must reproduce its logits (float32, <= 1e-5 relative:
max |got - want| / max |want|).

MoE layers use dropless dispatch here (the presets' default): with capacity
dispatch a token may be dropped or kept depending on which other tokens share
its batch, so a one-token decode step and a full forward legitimately differ.
"""

import jax
import jax.numpy as jnp
import numpy as np

TOL = 1e-5
MAX_LEN = 10    # one cache shape (and 8-token sequences) across tests: compiles are shared

forward = jax.jit(lambda model, tokens: model(tokens)[0])
extend = jax.jit(lambda model, tokens, cache, lengths: model.extend(tokens, cache, lengths))
extend_all = jax.jit(lambda model, tokens, cache: model.extend(tokens, cache))


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def assert_dropless(cfg) -> None:
    assert cfg.moe is None or cfg.moe.capacity_factor is None, "decode tests need dropless dispatch"


def decode_in_chunks(model, tokens_BS, chunks, max_len=None, extend_fn=None):
    """Feed tokens_BS through extend in consecutive chunks of the given sizes -> logits [B, S, V]."""
    b, s = tokens_BS.shape
    assert sum(chunks) == s
    cache = model.init_cache(b, max_len or MAX_LEN)
    out, start = [], 0
    for size in chunks:
        logits, cache = (extend_fn or extend_all)(model, jnp.asarray(tokens_BS[:, start:start + size]),
                                                  cache)
        out.append(np.asarray(logits))
        start += size
    np.testing.assert_array_equal(cache.lengths_B, s)
    np.testing.assert_array_equal(cache.tokens_BT[:, :s], tokens_BS)
    return np.concatenate(out, axis=1)


def check_prefill_then_steps(model, vocab: int, n: int = 5, m: int = 3, seed: int = 0):
    """Prefill n tokens, then m single-token extends == one full forward over n+m (2 rows)."""
    tokens = np.random.default_rng(seed).integers(0, vocab, size=(2, n + m)).astype(np.int32)
    want = np.asarray(forward(model, jnp.asarray(tokens)))
    got = decode_in_chunks(model, tokens, [n] + [1] * m, max_len=max(MAX_LEN, n + m))
    assert rel_err(got, want) <= TOL, rel_err(got, want)


def check_ragged_batch(model, vocab: int, lengths=(5, 2, 7), steps: int = 2, seed: int = 1):
    """Prompts of different lengths in one padded extend, then single-token steps: every row
    equals the full forward of that row alone."""
    rng = np.random.default_rng(seed)
    b, s = len(lengths), max(lengths)
    prompts = rng.integers(0, vocab, size=(b, s)).astype(np.int32)
    prompts[np.arange(s)[None, :] >= np.asarray(lengths)[:, None]] = -1   # padding ids: anything
    nxt = rng.integers(0, vocab, size=(b, steps)).astype(np.int32)
    cache = model.init_cache(b, s + steps)
    logits, cache = extend(model, jnp.asarray(prompts), cache, jnp.asarray(lengths, jnp.int32))
    got = [np.asarray(logits)]
    for i in range(steps):
        step, cache = extend_all(model, jnp.asarray(nxt[:, i:i + 1]), cache)
        got.append(np.asarray(step))
    np.testing.assert_array_equal(cache.lengths_B, np.asarray(lengths) + steps)
    for row, n in enumerate(lengths):
        alone = np.concatenate([prompts[row, :n], nxt[row]])[None]
        want = np.asarray(forward(model, jnp.asarray(alone)))[0]
        row_got = np.concatenate([got[0][row, :n]] + [g[row] for g in got[1:]])
        assert rel_err(row_got, want) <= TOL, (row, rel_err(row_got, want))
