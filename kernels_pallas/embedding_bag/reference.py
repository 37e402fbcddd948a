"""Pure-jnp embedding bag: the reference for the kernels and the XLA fallback.

``out[t] = sum_j weights[t, j] * table[indices[t, j]]`` with float32
accumulation. Indices are clamped into ``[0, N - 1]`` (the behaviour of every
backend, see ``ops.embedding_bag``).

Memory layers gather ``T * k`` rows (k = 32 of 512k+ slots, D up to 1024):
materialising all of them at once costs ``T * k * D * 4`` bytes (1 GiB for
T = 8192, D = 1024). XLA:CPU does not fuse the gather into the reduction,
so large calls are split into token chunks whose gathered rows stay within
``CHUNK_BYTES``; smaller calls take a single gather + einsum. The limit is
high on purpose: the chunk loop runs about 2.4x slower on XLA:CPU than one
gather + einsum (measured at T=1024, k=32, D=512), so it only serves to keep
huge calls from exhausting memory.
"""

import functools

import jax
import jax.numpy as jnp

CHUNK_BYTES = 256 * 2**20  # gathered f32 rows per chunk


def clamp_indices(indices_Tk, num_rows):
    """Out-of-range indices read the nearest valid row (jnp.take mode='clip') -> int32.

    Clipped before the cast: an int64 or uint32 index of 2**31 or more wrapped
    around in int32 (to a negative or small index, so another row was read)."""
    if jnp.dtype(indices_Tk.dtype).itemsize < 4:  # narrow: widen first, N - 1 may not fit
        indices_Tk = indices_Tk.astype(jnp.int32)
    return jnp.clip(indices_Tk, 0, num_rows - 1).astype(jnp.int32)


def _bag_sum(table_ND, indices_Tk, weights_Tk):
    """Gather + weighted sum of one token chunk, accumulated in float32 -> [T, D] f32."""
    rows_TkD = jnp.take(table_ND, indices_Tk, axis=0, mode="clip")
    return jnp.einsum("tkd,tk->td", rows_TkD, weights_Tk.astype(jnp.float32),
                      preferred_element_type=jnp.float32)


def tokens_per_chunk(num_tokens, k, d):
    """How many tokens one chunk holds so that its f32 rows stay within CHUNK_BYTES."""
    return int(max(1, min(num_tokens, CHUNK_BYTES // max(1, k * d * 4))))


def map_token_chunks(fn, per_token_arrays, k, d):
    """``fn`` over all tokens, in chunks whose gathered f32 rows fit CHUNK_BYTES.

    ``fn`` maps arrays with a leading token axis to one such array; lax.map
    with batch_size vmaps it over a chunk at a time (remainder included), so
    only one chunk's gathered rows are live.
    """
    num_tokens = per_token_arrays[0].shape[0]
    chunk = tokens_per_chunk(num_tokens, k, d)
    if chunk >= num_tokens:
        return fn(*per_token_arrays)
    one_token = lambda xs: fn(*(x[None] for x in xs))[0]  # noqa: E731
    return jax.lax.map(one_token, tuple(per_token_arrays), batch_size=chunk)


def embedding_bag_reference(table_ND, indices_Tk, weights_Tk, out_dtype=None):
    """[N, D], [T, k], [T, k] -> [T, D] in ``out_dtype`` (default: the table dtype)."""
    out_dtype = out_dtype or table_ND.dtype
    indices_Tk = clamp_indices(indices_Tk, table_ND.shape[0])
    out_TD = map_token_chunks(functools.partial(_bag_sum, table_ND), (indices_Tk, weights_Tk),
                              indices_Tk.shape[1], table_ND.shape[1])
    return out_TD.astype(out_dtype)
