"""Attention: RMSNorm, rotary embeddings, grouped-query attention.

B batch, S query length, T key length, H query heads, G kv heads (H = G*R),
K head dim.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
import numpy as np
from jaxtyping import Array, Float, Int

from moejax import sharding
from moejax.config import ModelConfig, YarnConfig


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

    def __call__(self, x_BSD: Float[Array, "B S D"], positions_BS: Int[Array, "B S"]
                 ) -> Float[Array, "B S D"]:
        cfg = self.cfg
        x_BSD = x_BSD.astype(self.dtype)
        q_BSHK = self._project(x_BSD, self.wq, "bq")
        k_BTGK = self._project(x_BSD, self.wk, "bk")
        v_BTGK = self._project(x_BSD, self.wv, "bv")
        if cfg.qk_norm != "none":
            q_BSHK = self._qk_norm(self.q_norm, q_BSHK)
            k_BTGK = self._qk_norm(self.k_norm, k_BTGK)
        cos, sin = rope_angles(positions_BS, cfg.resolved_head_dim, cfg.rope_theta, cfg.rope_yarn)
        q_BSHK, k_BTGK = apply_rope(q_BSHK, cos, sin), apply_rope(k_BTGK, cos, sin)
        q_BSHK = sharding.constrain(q_BSHK, ("batch", "seq", "heads", None))

        b, s, h, k = q_BSHK.shape
        groups = cfg.n_kv_heads
        q_BSGRK = q_BSHK.reshape(b, s, groups, h // groups, k)
        scores_BGRST = jnp.einsum("bsgrk,btgk->bgrst", q_BSGRK, k_BTGK,
                                  preferred_element_type=jnp.float32) * (k ** -0.5)
        causal_ST = positions_BS[:, :, None] >= positions_BS[:, None, :]
        scores_BGRST = jnp.where(causal_ST[:, None, None], scores_BGRST, -1e30)
        probs_BGRST = jax.nn.softmax(scores_BGRST, axis=-1).astype(self.dtype)
        out_BSGRK = jnp.einsum("bgrst,btgk->bsgrk", probs_BGRST, v_BTGK)
        out_BSHK = out_BSGRK.reshape(b, s, h, k)
        return jnp.einsum("bshk,hkd->bsd", out_BSHK, self.wo[...].astype(self.dtype))


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
    """

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

    def __call__(self, x_BSD: Float[Array, "B S D"], positions_BS: Int[Array, "B S"]
                 ) -> Float[Array, "B S D"]:
        mla, dt = self.cfg.mla, self.dtype
        x_BSD = x_BSD.astype(dt)
        q_BSHK = self._queries(x_BSD)
        q_nope_BSHN = q_BSHK[..., :mla.qk_nope_head_dim]
        q_rope_BSHP = q_BSHK[..., mla.qk_nope_head_dim:]
        lat_BTC = self.kv_norm(jnp.einsum("btd,dc->btc", x_BSD, self.wkv_a[...].astype(dt)))
        k_nope_BTHN = jnp.einsum("btc,chn->bthn", lat_BTC, self.wk_b[...].astype(dt))
        v_BTHV = jnp.einsum("btc,chv->bthv", lat_BTC, self.wv_b[...].astype(dt))
        k_rope_BT1P = jnp.einsum("btd,dp->btp", x_BSD, self.wk_rope[...].astype(dt))[:, :, None, :]

        cos, sin = rope_angles(positions_BS, mla.qk_rope_head_dim, self.cfg.rope_theta, self.cfg.rope_yarn)
        q_rope_BSHP, k_rope_BT1P = apply_rope(q_rope_BSHP, cos, sin), apply_rope(k_rope_BT1P, cos, sin)
        q_nope_BSHN = sharding.constrain(q_nope_BSHN, ("batch", "seq", "heads", None))

        scores_BHST = (jnp.einsum("bshn,bthn->bhst", q_nope_BSHN, k_nope_BTHN,
                                  preferred_element_type=jnp.float32)
                       + jnp.einsum("bshp,btp->bhst", q_rope_BSHP, k_rope_BT1P[:, :, 0],
                                    preferred_element_type=jnp.float32))
        scores_BHST = scores_BHST * (mla.qk_head_dim ** -0.5 * mla.softmax_mscale)
        causal_ST = positions_BS[:, :, None] >= positions_BS[:, None, :]
        scores_BHST = jnp.where(causal_ST[:, None], scores_BHST, -1e30)
        probs_BHST = jax.nn.softmax(scores_BHST, axis=-1).astype(dt)
        out_BSHV = jnp.einsum("bhst,bthv->bshv", probs_BHST, v_BTHV)
        return jnp.einsum("bshv,hvd->bsd", out_BSHV, self.wo[...].astype(dt))
