"""Attention: RMSNorm, rotary embeddings, grouped-query attention.

B batch, S query length, T key length, H query heads, G kv heads (H = G*R),
K head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from moejax import sharding
from moejax.config import ModelConfig


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


def rope_angles(positions_BS: Int[Array, "B S"], head_dim: int, theta: float):
    """cos, sin [B, S, K] in the half-split layout (rotate_half convention)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles_BSk = positions_BS.astype(jnp.float32)[..., None] * inv_freq[None, None, :]
    angles_BSK = jnp.concatenate([angles_BSk, angles_BSk], axis=-1)
    return jnp.cos(angles_BSK), jnp.sin(angles_BSK)


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
        cos, sin = rope_angles(positions_BS, cfg.resolved_head_dim, cfg.rope_theta)
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
