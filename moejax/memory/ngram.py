"""Hashed n-gram memory (DeepSeek's Engram, "Conditional Memory via Scalable Lookup").

B batch, S chunk length, L = max order - 1 previous ids, O orders, H hash heads
per order, M = O * H rows per token, R table rows, E = M * R_d (the width of
the concatenated rows), D model width, W = (conv kernel - 1) * dilation.
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from moejax.layers import LayerAux
from moejax.config import ConfigError, MemoryConfig
from moejax.memory.product_key import VALUES

_MIX = np.uint32(0x9E3779B1)  # odd; a final multiply so the low bits see every input bit


class HashMultipliers(nnx.Variable):
    """Per-layer odd hash multipliers [O, H, n_max] (uint32): drawn at init, never trained,
    saved with the model (serving needs them to compute the rows)."""


def hash_multipliers(key: Array, cfg: MemoryConfig) -> Array:
    """[O, H, max order] odd uint32 multipliers drawn from ``key`` folded with ``cfg.hash_seed``:
    every layer draws its own (also the layers of a scanned group, which are built from split
    rng streams), and another hash_seed gives other hashes from the same model seed."""
    shape = (len(cfg.ngram_orders), cfg.ngram_heads, max(cfg.ngram_orders))
    return jax.random.bits(jax.random.fold_in(key, cfg.hash_seed), shape, jnp.uint32) | jnp.uint32(1)


def table_layout(cfg: MemoryConfig) -> tuple[np.ndarray, np.ndarray, int]:
    """(prime size [O, H], first row [O, H], total rows R) of the concatenated head tables."""
    sizes_OH = np.array(cfg.ngram_table_sizes(), dtype=np.int64)
    offsets_OH = (np.cumsum(sizes_OH.reshape(-1)) - sizes_OH.reshape(-1)).reshape(sizes_OH.shape)
    return sizes_OH, offsets_OH, int(sizes_OH.sum())


def id_map_table(name: str, vocab_size: int) -> np.ndarray | None:
    """Canonical id of every id < vocab_size, or None for no normalisation."""
    if name == "none":
        return None
    if vocab_size != 256:
        raise ConfigError(f"MemoryConfig.ngram_id_map: {name!r} needs a byte-level vocabulary "
                          f"(vocab_size=256), got {vocab_size}")
    ids = np.arange(256, dtype=np.int32)
    upper = (ids >= ord("A")) & (ids <= ord("Z"))
    return np.where(upper, ids + 32, ids).astype(np.int32)


def ngram_indices(tokens_BS: Int[Array, "B S"], prev_tokens_BN: Int[Array, "B N"] | None,
                  multipliers_OHn: Array, cfg: MemoryConfig, id_map: np.ndarray | None = None
                  ) -> Int[Array, "B S M"]:
    """Table row of every (position, order, hash head); depends on token ids only.

    For order n the suffix n-gram at position t is ids t-n+1 .. t; ids before
    the chunk come from ``prev_tokens_BN`` (its last L columns; -1 = none, as
    is everything before a full sequence). Hash of head h (uint32 arithmetic,
    wrapping, so no int32 overflow):
        x = XOR over i < n of id[t - i] * mult[o, h, i];  x ^= x >> 15; x *= MIX; x ^= x >> 13
        row = offset[o, h] + x mod prime[o, h]     (< 2^31: safe as int32)
    Returns [B, S, O * H] int32 rows, order-major.
    """
    lookback = max(cfg.ngram_orders) - 1
    batch, seq = tokens_BS.shape
    if prev_tokens_BN is None:
        prev_BL = jnp.full((batch, lookback), -1, jnp.int32)
    else:
        if prev_tokens_BN.shape[1] < lookback:
            raise ValueError(f"ngram_indices: needs {lookback} previous ids, got {prev_tokens_BN.shape}")
        prev_BL = prev_tokens_BN[:, prev_tokens_BN.shape[1] - lookback:].astype(jnp.int32)
    ids_BX = jnp.concatenate([prev_BL, tokens_BS.astype(jnp.int32)], axis=1)
    if id_map is not None:
        inside = (ids_BX >= 0) & (ids_BX < id_map.shape[0])
        ids_BX = jnp.where(inside, jnp.take(jnp.asarray(id_map), ids_BX, mode="clip"), ids_BX)
    u_BX = ids_BX.astype(jnp.uint32)  # -1 -> 0xFFFFFFFF: "no token" hashes like any other id
    sizes_OH, offsets_OH, _ = table_layout(cfg)
    mult_OHn = multipliers_OHn.astype(jnp.uint32)
    rows = []
    for o, order in enumerate(cfg.ngram_orders):
        x_BSH = jnp.zeros((batch, seq, cfg.ngram_heads), jnp.uint32)
        for i in range(order):  # id at t - i sits at column lookback + t - i of ids_BX
            tok_BS1 = u_BX[:, lookback - i:lookback - i + seq, None]
            x_BSH = x_BSH ^ (tok_BS1 * mult_OHn[o, :, i][None, None, :])
        x_BSH = x_BSH ^ (x_BSH >> 15)
        x_BSH = x_BSH * _MIX
        x_BSH = x_BSH ^ (x_BSH >> 13)
        row_BSH = x_BSH % jnp.asarray(sizes_OH[o], jnp.uint32)[None, None, :]
        rows.append(row_BSH.astype(jnp.int32) + jnp.asarray(offsets_OH[o], jnp.int32)[None, None, :])
    return jnp.concatenate(rows, axis=-1)


def ngram_lookup(table_RE: Float[Array, "R Rd"], rows_BSM: Int[Array, "B S M"]) -> Float[Array, "B S E"]:
    """Concatenate the M looked-up rows of every position -> [B, S, M * Rd]."""
    batch, seq, m = rows_BSM.shape
    rows_BSMd = jnp.take(table_RE, rows_BSM, axis=0, mode="clip")
    return rows_BSMd.reshape(batch, seq, m * table_RE.shape[1])


def _rms(x, eps=1e-6):
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


def _normal(rngs: nnx.Rngs, shape, stddev: float):
    return nnx.initializers.normal(stddev=stddev)(rngs.params(), shape, jnp.float32)


class NGramMemory(nnx.Module):
    """Engram layer (an FFN kind: 'engram'); ``y_BSD, aux = layer(x_BSD, ctx)``.

    1. rows = ngram_indices(ctx tokens, ctx.prev_tokens_BN): one row per
       (order, hash head) and position; e = their concatenation [B, S, E].
    2. Gate: ``a = sigmoid(rms(x) . rms(e W_k) / sqrt(D))`` per position (each
       rms with a learned scale); ``v = a * (e W_v)``.
    3. ``y = v + silu(conv(rms(v)))``: a causal depthwise convolution (kernel
       ``ngram_conv_kernel``, dilation = the largest order) initialised to
       zero, so the layer starts as the gated lookup alone.
    In decoding, ``ctx.state`` holds the last W conv inputs of each row and
    the updated ones go to ``ctx.new_state``; ``token_lookback`` previous ids
    come in ``ctx.prev_tokens_BN``.
    """

    def __init__(self, cfg: MemoryConfig, d_model: int, *, rngs: nnx.Rngs,
                 vocab_size: int, dtype=jnp.float32):
        self.cfg, self.dtype = cfg, dtype
        self.token_lookback = max(cfg.ngram_orders) - 1
        self.dilation = max(cfg.ngram_orders)
        self.window = (cfg.ngram_conv_kernel - 1) * self.dilation
        id_map = id_map_table(cfg.ngram_id_map, vocab_size)  # a tuple: static and hashable
        self.id_map = None if id_map is None else tuple(int(i) for i in id_map)
        _, _, num_rows = table_layout(cfg)
        e = len(cfg.ngram_orders) * cfg.ngram_heads * cfg.ngram_d_row
        self.multipliers = HashMultipliers(hash_multipliers(rngs.params(), cfg))
        setattr(self, VALUES, nnx.Param(_normal(rngs, (num_rows, cfg.ngram_d_row), 1.0),
                                        logical_axes=(None, "mem_values")))
        self.w_k = nnx.Param(_normal(rngs, (e, d_model), e ** -0.5), logical_axes=(None, "embed"))
        self.w_v = nnx.Param(_normal(rngs, (e, d_model), e ** -0.5), logical_axes=(None, "embed"))
        self.x_scale = nnx.Param(jnp.ones((d_model,), jnp.float32), logical_axes=("embed",))
        self.k_scale = nnx.Param(jnp.ones((d_model,), jnp.float32), logical_axes=("embed",))
        self.v_scale = nnx.Param(jnp.ones((d_model,), jnp.float32), logical_axes=("embed",))
        self.conv = nnx.Param(jnp.zeros((cfg.ngram_conv_kernel, d_model), jnp.float32),
                              logical_axes=(None, "embed"))

    def init_state(self, batch_size: int, max_len: int):
        """Decode state: the last W conv inputs of each row [B, W, D] (zeros: before the start)."""
        del max_len
        return jnp.zeros((batch_size, self.window, self.conv.shape[-1]), jnp.float32)

    def rows(self, tokens_BS, prev_tokens_BN=None) -> Int[Array, "B S M"]:
        """The table rows this layer reads (issue early: they depend on ids only)."""
        id_map = None if self.id_map is None else np.asarray(self.id_map, np.int32)
        return ngram_indices(tokens_BS, prev_tokens_BN, self.multipliers[...], self.cfg, id_map)

    def __call__(self, x_BSD: Float[Array, "B S D"], ctx):
        """FFN-kind call -> (y, LayerAux()); in decoding sets ``ctx.new_state``."""
        state_BWD = ctx.state
        if state_BWD is not None:   # a row starting at position 0 has no inputs before it, whatever
            # its state still holds (a serving slot reused for a new request keeps the old window)
            state_BWD = jnp.where(ctx.positions_BS[:, :1, None] == 0, 0, state_BWD).astype(state_BWD.dtype)
        y_BSD, new_state = self.apply(x_BSD, ctx.tokens_BS, ctx.prev_tokens_BN, state_BWD, ctx.valid_BS)
        if ctx.state is not None:  # decoding: hand the window on to the next call
            ctx.new_state = new_state
        return y_BSD, LayerAux()

    def apply(self, x_BSD, tokens_BS, prev_tokens_BN=None, state_BWD=None, valid_BS=None):
        """Steps 1-3 -> (y [B, S, D], the conv window after this chunk [B, W, D])."""
        dt = self.dtype
        e_BSE = ngram_lookup(getattr(self, VALUES)[...], self.rows(tokens_BS, prev_tokens_BN))
        k_BSD = jnp.einsum("bse,ed->bsd", e_BSE.astype(dt), self.w_k[...].astype(dt),
                           preferred_element_type=jnp.float32)
        v_BSD = jnp.einsum("bse,ed->bsd", e_BSE.astype(dt), self.w_v[...].astype(dt),
                           preferred_element_type=jnp.float32)
        h_BSD = _rms(x_BSD.astype(jnp.float32)) * self.x_scale[...][None, None]
        k_BSD = _rms(k_BSD) * self.k_scale[...][None, None]
        d_model = x_BSD.shape[-1]
        gate_BS1 = jax.nn.sigmoid(jnp.sum(h_BSD * k_BSD, axis=-1, keepdims=True) / np.sqrt(d_model))
        v_BSD = gate_BS1 * v_BSD
        u_BSD = _rms(v_BSD) * self.v_scale[...][None, None]
        conv_BSD, new_state_BWD = self._causal_conv(u_BSD, state_BWD, valid_BS)
        y_BSD = v_BSD + jax.nn.silu(conv_BSD)
        return y_BSD.astype(x_BSD.dtype), new_state_BWD

    def _causal_conv(self, u_BSD, state_BWD, valid_BS):
        """out[t] = sum_j conv[j] * u[t - j * dilation]; inputs before the chunk come from
        the state (zeros outside decoding). Returns (out, the last W valid inputs)."""
        batch, seq, d_model = u_BSD.shape
        if state_BWD is None:
            state_BWD = jnp.zeros((batch, self.window, d_model), u_BSD.dtype)
        buf_BXD = jnp.concatenate([state_BWD.astype(u_BSD.dtype), u_BSD], axis=1)
        w_KD = self.conv[...]
        out_BSD = jnp.zeros_like(u_BSD)
        for j in range(w_KD.shape[0]):
            start = self.window - j * self.dilation
            out_BSD = out_BSD + buf_BXD[:, start:start + seq] * w_KD[j][None, None]
        length_B = seq if valid_BS is None else jnp.sum(valid_BS, axis=1).astype(jnp.int32)
        take_BW = (jnp.broadcast_to(jnp.asarray(length_B, jnp.int32), (batch,))[:, None]
                   + jnp.arange(self.window, dtype=jnp.int32)[None, :])
        new_state_BWD = jnp.take_along_axis(buf_BXD, take_BW[:, :, None], axis=1)
        return out_BSD, new_state_BWD
