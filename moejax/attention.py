"""Attention: RMSNorm, rotary embeddings, grouped-query and multi-head latent attention.

B batch, S query length, T key length, H query heads, G kv heads (H = G*R),
K head dim. Both attention modules run through ``attend`` (moejax.attend) and
take and return their decode cache (gemma style)::

    out_BSD, cache = attn(x_BSD, positions_BS, cache=None, valid_BS=None)

Without a cache the call is a causal full forward and returns ``(out, None)``.
With one, the S new tokens sit at ``positions_BS`` (each row's current length
onwards); those with ``valid_BS`` True are written into the cache (padding
never is) and the queries attend to every cached key up to their position.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from moejax import sharding
from moejax.attend import Mask, attend
from moejax.config import ModelConfig, YarnConfig

__all__ = ["RMSNorm", "Attention", "MLAttention", "attend", "Mask", "rope_angles", "apply_rope",
           "write_cache", "cache_mask"]


class RMSNorm(nnx.Module):
    """``x / rms(x) * scale`` computed in float32, cast back to the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6, *, logical_axis: str | None = "embed"):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), logical_axes=(logical_axis,))

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        scale = self.scale[...].reshape((1,) * (x.ndim - 1) + (-1,))  # explicit rank: no promotion
        return (normed * scale).astype(x.dtype)


def yarn_inv_freq(head_dim: int, theta: float, yarn: YarnConfig) -> np.ndarray:
    """YaRN frequencies [K/2]: original ones for the fast dims, /factor for the slow ones.

    The dims between the correction bounds (where beta_fast / beta_slow
    rotations fit in the original context) blend the two by a linear ramp.
    """
    def correction_dim(rotations):
        return (head_dim * math.log(yarn.original_max_position_embeddings / (rotations * 2 * math.pi))
                / (2 * math.log(theta)))
    low, high = correction_dim(yarn.beta_fast), correction_dim(yarn.beta_slow)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # a ramp of width zero would divide by zero
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    keep_original = 1.0 - ramp
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    return (inv_freq / yarn.factor * (1 - keep_original) + inv_freq * keep_original).astype(np.float32)


def rope_angles(positions_BS: Int[Array, "B S"], head_dim: int, theta: float,
                yarn: YarnConfig | None = None):
    """cos, sin [B, S, K] in the half-split layout (rotate_half convention).

    With YaRN the frequencies are rescaled and cos/sin multiplied by its
    attention factor.
    """
    if yarn is None:
        inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
        magnitude = 1.0
    else:
        inv_freq, magnitude = jnp.asarray(yarn_inv_freq(head_dim, theta, yarn)), yarn.attention_factor
    angles_BSk = positions_BS.astype(jnp.float32)[..., None] * inv_freq[None, None, :]
    angles_BSK = jnp.concatenate([angles_BSk, angles_BSk], axis=-1)
    return jnp.cos(angles_BSK) * magnitude, jnp.sin(angles_BSK) * magnitude


def apply_rope(x_BSHK: Array, cos_BSK: Array, sin_BSK: Array) -> Array:
    half = x_BSHK.shape[-1] // 2
    x32 = x_BSHK.astype(jnp.float32)
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos_BSK[:, :, None, :] + rotated * sin_BSK[:, :, None, :]
    return out.astype(x_BSHK.dtype)


def write_cache(cache_BTX: Array, new_BSX: Array, positions_BS: Int[Array, "B S"],
                valid_BS: Bool[Array, "B S"] | None) -> Array:
    """Write the new rows at their positions; padding (valid False) is dropped, never written."""
    b, t = cache_BTX.shape[:2]
    slot_BS = positions_BS if valid_BS is None else jnp.where(valid_BS, positions_BS, t)
    rows_B1 = jnp.arange(b, dtype=jnp.int32)[:, None]
    out_BTX = cache_BTX.at[rows_B1, slot_BS].set(new_BSX.astype(cache_BTX.dtype), mode="drop")
    # [B, T, G, K] per-head caches split like the heads; latent [B, T, C] caches are not
    heads = ("cache_heads", None) if out_BTX.ndim == 4 else (None,)
    return sharding.constrain(out_BTX, ("cache_batch", "cache_seq") + heads)


def cache_mask(positions_BS: Int[Array, "B S"], valid_BS: Bool[Array, "B S"] | None, max_len: int
               ) -> Mask:
    """Queries at ``positions_BS`` against cache slots 0..T-1: slots past the new length are empty."""
    start_B = positions_BS[:, 0]
    added_B = (positions_BS.shape[1] if valid_BS is None
               else valid_BS.sum(axis=1, dtype=jnp.int32))
    slot_1T = jnp.arange(max_len, dtype=jnp.int32)[None, :]
    kv_positions_BT = jnp.where(slot_1T < (start_B + added_B)[:, None], slot_1T, -1)
    return Mask(positions_BS, kv_positions_BT)


class Attention(nnx.Module):
    """Causal grouped-query attention with RoPE.

    1. q = x @ Wq [D, H, K]; k, v = x @ Wk, Wv [D, G, K] (+ bias if configured).
    2. Optional q/k RMSNorm: per head over K ('head', Qwen3) or over the whole
       projection H*K / G*K ('proj', OLMoE).
    3. RoPE on q and k; scores q.k / sqrt(K) in float32, causal mask, softmax.
    4. out = (probs @ v) @ Wo [H, K, D].
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, h, g, k = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
        self.dtype = jnp.dtype(cfg.dtype)
        init = nnx.initializers.normal(stddev=d ** -0.5)
        out_init = nnx.initializers.normal(stddev=(h * k) ** -0.5)
        self.wq = nnx.Param(init(rngs.params(), (d, h, k)), logical_axes=("embed", "heads", None))
        self.wk = nnx.Param(init(rngs.params(), (d, g, k)), logical_axes=("embed", "kv_heads", None))
        self.wv = nnx.Param(init(rngs.params(), (d, g, k)), logical_axes=("embed", "kv_heads", None))
        self.wo = nnx.Param(out_init(rngs.params(), (h, k, d)), logical_axes=("heads", None, "embed"))
        if cfg.attention_bias:
            self.bq = nnx.Param(jnp.zeros((h, k)), logical_axes=("heads", None))
            self.bk = nnx.Param(jnp.zeros((g, k)), logical_axes=("kv_heads", None))
            self.bv = nnx.Param(jnp.zeros((g, k)), logical_axes=("kv_heads", None))
        if cfg.qk_norm == "head":
            self.q_norm = RMSNorm(k, cfg.rms_norm_eps, logical_axis=None)
            self.k_norm = RMSNorm(k, cfg.rms_norm_eps, logical_axis=None)
        elif cfg.qk_norm == "proj":
            self.q_norm = RMSNorm(h * k, cfg.rms_norm_eps, logical_axis=None)
            self.k_norm = RMSNorm(g * k, cfg.rms_norm_eps, logical_axis=None)

    def _project(self, x_BSD, w_DHK, bias_name):
        out = jnp.einsum("bsd,dhk->bshk", x_BSD, w_DHK[...].astype(self.dtype))
        if self.cfg.attention_bias:
            out = out + getattr(self, bias_name)[...].astype(self.dtype)[None, None]
        return out

    def _qk_norm(self, norm: RMSNorm, x_BSHK):
        if self.cfg.qk_norm == "head":
            return norm(x_BSHK)
        b, s, h, k = x_BSHK.shape
        return norm(x_BSHK.reshape(b, s, h * k)).reshape(b, s, h, k)

    def init_cache(self, batch_size: int, max_len: int) -> dict[str, Array]:
        """Empty keys and values [B, T, G, K] in the compute dtype."""
        cfg = self.cfg
        shape = (batch_size, max_len, cfg.n_kv_heads, cfg.resolved_head_dim)
        return {"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype)}

    def __call__(self, x_BSD: Float[Array, "B S D"], positions_BS: Int[Array, "B S"],
                 cache: dict[str, Array] | None = None, valid_BS: Bool[Array, "B S"] | None = None
                 ) -> tuple[Float[Array, "B S D"], dict[str, Array] | None]:
        cfg = self.cfg
        x_BSD = x_BSD.astype(self.dtype)
        q_BSHK = self._project(x_BSD, self.wq, "bq")
        k_BSGK = self._project(x_BSD, self.wk, "bk")
        v_BSGK = self._project(x_BSD, self.wv, "bv")
        if cfg.qk_norm != "none":
            q_BSHK = self._qk_norm(self.q_norm, q_BSHK)
            k_BSGK = self._qk_norm(self.k_norm, k_BSGK)
        cos, sin = rope_angles(positions_BS, cfg.resolved_head_dim, cfg.rope_theta, cfg.rope_yarn)
        q_BSHK, k_BSGK = apply_rope(q_BSHK, cos, sin), apply_rope(k_BSGK, cos, sin)
        q_BSHK = sharding.constrain(q_BSHK, ("batch", "seq", "heads", None))
        if cache is None:
            k_BTGK, v_BTGK, mask = k_BSGK, v_BSGK, Mask.causal(positions_BS)
        else:
            cache = {"k": write_cache(cache["k"], k_BSGK, positions_BS, valid_BS),
                     "v": write_cache(cache["v"], v_BSGK, positions_BS, valid_BS)}
            k_BTGK, v_BTGK = cache["k"], cache["v"]
            mask = cache_mask(positions_BS, valid_BS, k_BTGK.shape[1])
        out_BSHK = attend(q_BSHK, k_BTGK, v_BTGK, mask, scale=cfg.resolved_head_dim ** -0.5)
        return jnp.einsum("bshk,hkd->bsd", out_BSHK, self.wo[...].astype(self.dtype)), cache


class MLAttention(nnx.Module):
    """Multi-head latent attention (DeepSeek-V2/V3), causal, with RoPE.

    N = qk_nope_head_dim, P = qk_rope_head_dim, V = v_head_dim, C = kv_lora_rank,
    Q = q_lora_rank.
    1. Queries: q = x @ Wq [D, H, N+P], or through the low-rank bottleneck
       q = rmsnorm(x @ Wq_a [D, Q]) @ Wq_b [Q, H, N+P]; split into q_nope, q_rope.
    2. Keys/values: latent c = rmsnorm(x @ Wkv_a [D, C]); k_nope = c @ Wk_b
       [C, H, N], v = c @ Wv_b [C, H, V]; one rotary key k_rope = x @ Wk_rope
       [D, P] shared by all heads.
    3. RoPE (half-split layout) on q_rope and k_rope; scores
       (q_nope.k_nope + q_rope.k_rope) / sqrt(N+P) in float32, causal mask, softmax.
    4. out = (probs @ v) @ Wo [H, V, D].
    The cache holds only c and the rotated k_rope. Decoding against it folds
    Wk_b into the query and Wv_b after attention (``decode_absorbed``, see
    ``_absorbed``; measured against expanding the cache in benchmarks/RESULTS.md).
    """

    decode_absorbed: bool = True

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if cfg.mla is None:
            raise ValueError("MLAttention needs ModelConfig.mla")
        self.cfg = cfg
        mla = cfg.mla
        d, h = cfg.d_model, cfg.n_heads
        qk, c, p = mla.qk_head_dim, mla.kv_lora_rank, mla.qk_rope_head_dim
        self.dtype = jnp.dtype(cfg.dtype)

        def param(shape, fan_in, axes):
            init = nnx.initializers.normal(stddev=fan_in ** -0.5)
            return nnx.Param(init(rngs.params(), shape), logical_axes=axes)

        if mla.q_lora_rank is None:
            self.wq = param((d, h, qk), d, ("embed", "heads", None))
        else:
            q = mla.q_lora_rank
            self.wq_a = param((d, q), d, ("embed", None))
            self.q_norm = RMSNorm(q, mla.latent_norm_eps, logical_axis=None)
            self.wq_b = param((q, h, qk), q, (None, "heads", None))
        self.wkv_a = param((d, c), d, ("embed", None))
        self.kv_norm = RMSNorm(c, mla.latent_norm_eps, logical_axis=None)
        self.wk_rope = param((d, p), d, ("embed", None))
        self.wk_b = param((c, h, mla.qk_nope_head_dim), c, (None, "heads", None))
        self.wv_b = param((c, h, mla.v_head_dim), c, (None, "heads", None))
        self.wo = param((h, mla.v_head_dim, d), h * mla.v_head_dim, ("heads", None, "embed"))

    def _queries(self, x_BSD):
        dt = self.dtype
        if self.cfg.mla.q_lora_rank is None:
            return jnp.einsum("bsd,dhk->bshk", x_BSD, self.wq[...].astype(dt))
        lat_BSQ = self.q_norm(jnp.einsum("bsd,dq->bsq", x_BSD, self.wq_a[...].astype(dt)))
        return jnp.einsum("bsq,qhk->bshk", lat_BSQ, self.wq_b[...].astype(dt))

    def init_cache(self, batch_size: int, max_len: int) -> dict[str, Array]:
        """Empty latent c [B, T, C] and rotary key [B, T, P]: what MLA decoding needs."""
        mla = self.cfg.mla
        return {"c": jnp.zeros((batch_size, max_len, mla.kv_lora_rank), self.dtype),
                "k_rope": jnp.zeros((batch_size, max_len, mla.qk_rope_head_dim), self.dtype)}

    def __call__(self, x_BSD: Float[Array, "B S D"], positions_BS: Int[Array, "B S"],
                 cache: dict[str, Array] | None = None, valid_BS: Bool[Array, "B S"] | None = None
                 ) -> tuple[Float[Array, "B S D"], dict[str, Array] | None]:
        mla, dt = self.cfg.mla, self.dtype
        x_BSD = x_BSD.astype(dt)
        q_BSHK = self._queries(x_BSD)
        q_nope_BSHN = q_BSHK[..., :mla.qk_nope_head_dim]
        q_rope_BSHP = q_BSHK[..., mla.qk_nope_head_dim:]
        lat_BSC = self.kv_norm(jnp.einsum("bsd,dc->bsc", x_BSD, self.wkv_a[...].astype(dt)))
        k_rope_BSP = jnp.einsum("bsd,dp->bsp", x_BSD, self.wk_rope[...].astype(dt))
        cos, sin = rope_angles(positions_BS, mla.qk_rope_head_dim, self.cfg.rope_theta, self.cfg.rope_yarn)
        q_rope_BSHP = apply_rope(q_rope_BSHP, cos, sin)
        k_rope_BSP = apply_rope(k_rope_BSP[:, :, None, :], cos, sin)[:, :, 0]
        q_nope_BSHN = sharding.constrain(q_nope_BSHN, ("batch", "seq", "heads", None))
        if cache is None:
            out_BSHV = self._expanded(q_nope_BSHN, q_rope_BSHP, lat_BSC, k_rope_BSP,
                                      Mask.causal(positions_BS))
        else:
            cache = {"c": write_cache(cache["c"], lat_BSC, positions_BS, valid_BS),
                     "k_rope": write_cache(cache["k_rope"], k_rope_BSP, positions_BS, valid_BS)}
            mask = cache_mask(positions_BS, valid_BS, cache["c"].shape[1])
            decode = self._absorbed if self.decode_absorbed else self._expanded
            out_BSHV = decode(q_nope_BSHN, q_rope_BSHP, cache["c"], cache["k_rope"], mask)
        return jnp.einsum("bshv,hvd->bsd", out_BSHV, self.wo[...].astype(dt)), cache

    @property
    def _scale(self) -> float:
        return self.cfg.mla.qk_head_dim ** -0.5 * self.cfg.mla.softmax_mscale

    def _expanded(self, q_nope_BSHN, q_rope_BSHP, lat_BTC, k_rope_BTP, mask):
        """Expand the latent to per-head keys [N | P] and values V, then attend (G = H)."""
        dt = self.dtype
        k_nope_BTHN = jnp.einsum("btc,chn->bthn", lat_BTC, self.wk_b[...].astype(dt))
        v_BTHV = jnp.einsum("btc,chv->bthv", lat_BTC, self.wv_b[...].astype(dt))
        k_rope_BTHP = jnp.broadcast_to(k_rope_BTP[:, :, None, :],
                                       k_nope_BTHN.shape[:3] + k_rope_BTP.shape[-1:])
        q_BSHK = jnp.concatenate([q_nope_BSHN, q_rope_BSHP], axis=-1)
        k_BTHK = jnp.concatenate([k_nope_BTHN, k_rope_BTHP], axis=-1)
        return attend(q_BSHK, k_BTHK, v_BTHV, mask, scale=self._scale)

    def _absorbed(self, q_nope_BSHN, q_rope_BSHP, lat_BTC, k_rope_BTP, mask):
        """Fold W_kb into the query and W_vb after attention: one shared key [C | P] (G = 1).

        q_nope.(c Wk_b) = (q_nope Wk_b^T).c, so the queries move into latent space
        and attend to the cached latent itself; (probs @ c) @ Wv_b = probs @ (c Wv_b).
        """
        dt = self.dtype
        q_lat_BSHC = jnp.einsum("bshn,chn->bshc", q_nope_BSHN, self.wk_b[...].astype(dt))
        q_BSHK = jnp.concatenate([q_lat_BSHC, q_rope_BSHP], axis=-1)
        k_BT1K = jnp.concatenate([lat_BTC, k_rope_BTP], axis=-1)[:, :, None, :]
        out_BSHC = attend(q_BSHK, k_BT1K, lat_BTC[:, :, None, :], mask, scale=self._scale)
        return jnp.einsum("bshc,chv->bshv", out_BSHC, self.wv_b[...].astype(dt))
