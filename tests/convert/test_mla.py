"""MLAttention against a float64 numpy reference written from the DeepSeek-V2
paper's equations (per head, per query position, explicit loops over keys)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.attention import MLAttention
from moejax.config import MLAConfig, ModelConfig, YarnConfig


def rms(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def rotate(x, pos, theta, inv_freq=None, magnitude=1.0):
    """Half-split RoPE of vector x at position pos."""
    half = x.shape[-1] // 2
    if inv_freq is None:
        inv_freq = 1.0 / theta ** (np.arange(half) * 2.0 / x.shape[-1])
    ang = pos * inv_freq
    cos, sin = np.cos(ang) * magnitude, np.sin(ang) * magnitude
    a, b = x[:half], x[half:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin])


def reference(p, x, cfg):
    mla = cfg.mla
    n = mla.qk_nope_head_dim
    seq = x.shape[0]
    if mla.q_lora_rank is None:
        q = np.einsum("sd,dhk->shk", x, p["wq"])
    else:
        q = np.einsum("sq,qhk->shk", rms(x @ p["wq_a"], p["q_norm"]["scale"], mla.latent_norm_eps), p["wq_b"])
    lat = rms(x @ p["wkv_a"], p["kv_norm"]["scale"], mla.latent_norm_eps)
    k_nope = np.einsum("tc,chn->thn", lat, p["wk_b"])
    v = np.einsum("tc,chv->thv", lat, p["wv_b"])
    k_rope = x @ p["wk_rope"]
    inv_freq, magnitude = None, 1.0
    if cfg.rope_yarn is not None:
        # The YaRN frequencies themselves are checked against transformers in
        # test_hf_logits; here only how MLA applies them.
        from moejax.attention import yarn_inv_freq
        inv_freq = yarn_inv_freq(mla.qk_rope_head_dim, cfg.rope_theta, cfg.rope_yarn).astype(np.float64)
        magnitude = cfg.rope_yarn.attention_factor
    out = np.zeros((seq, cfg.n_heads, mla.v_head_dim))
    for h in range(cfg.n_heads):
        for s in range(seq):
            qr = rotate(q[s, h, n:], s, cfg.rope_theta, inv_freq, magnitude)
            scores = np.array([q[s, h, :n] @ k_nope[t, h]
                               + qr @ rotate(k_rope[t], t, cfg.rope_theta, inv_freq, magnitude)
                               for t in range(s + 1)]) * mla.qk_head_dim ** -0.5 * mla.softmax_mscale
            w = np.exp(scores - scores.max())
            out[s, h] = (w / w.sum()) @ v[:s + 1, h]
    return np.einsum("shv,hvd->sd", out, p["wo"])


@pytest.mark.parametrize("q_lora_rank,yarn", [(None, False), (6, False), (6, True)])
def test_mla_matches_numpy_reference(q_lora_rank, yarn):
    mla = MLAConfig(kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=6, v_head_dim=5,
                    q_lora_rank=q_lora_rank, softmax_mscale=1.3 if yarn else 1.0)
    cfg = ModelConfig(vocab_size=8, d_model=12, n_layers=1, n_heads=3, n_kv_heads=3, d_ff=8, mla=mla,
                      rope_theta=50.0,
                      rope_yarn=YarnConfig(factor=4.0, original_max_position_embeddings=8,
                                           attention_factor=1.1) if yarn else None)
    attn = MLAttention(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    pure = jax.tree.map(lambda a: rng.normal(size=a.shape), nnx.to_pure_dict(nnx.state(attn)))
    nnx.update(attn, jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), pure))
    x = rng.normal(size=(7, 12))
    positions = jnp.arange(7, dtype=jnp.int32)[None]
    got = np.asarray(attn(jnp.asarray(x, jnp.float32)[None], positions)[0])[0]
    want = reference(pure, x, cfg)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())
