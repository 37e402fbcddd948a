"""Decoder-only Transformer assembled from attention, MoE and dense FFN blocks."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from moejax import sharding, validate
from moejax.attention import Attention, MLAttention, RMSNorm
from moejax.config import ModelConfig
from moejax.moe import MoE, SwiGLU


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x)).

    The FFN is an MoE block or a dense SwiGLU (``ModelConfig.is_moe_layer``).
    """

    def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.attn = MLAttention(cfg, rngs=rngs) if cfg.mla is not None else Attention(cfg, rngs=rngs)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.is_moe = cfg.is_moe_layer(layer)
        if self.is_moe:
            self.ffn = MoE(cfg.moe, rngs=rngs)
        else:
            self.ffn = SwiGLU(cfg.d_model, cfg.d_ff, rngs=rngs, dtype=jnp.dtype(cfg.dtype))

    def __call__(self, x_BSD, positions_BS):
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), positions_BS).astype(x_BSD.dtype)
        x_BSD = sharding.constrain(x_BSD, ("batch", "seq", "embed"))
        h_BSD = self.ffn_norm(x_BSD)
        if self.is_moe:
            y_BSD, aux = self.ffn(h_BSD)
        else:
            y_BSD, aux = self.ffn(h_BSD), None
        x_BSD = x_BSD + y_BSD.astype(x_BSD.dtype)
        return sharding.constrain(x_BSD, ("batch", "seq", "embed")), aux


class Transformer(nnx.Module):
    """Decoder-only language model.

    1. Embed tokens [B, S] -> [B, S, D] (float32 residual stream).
    2. n_layers pre-norm blocks (attention with RoPE; MoE or dense FFN).
    3. Final RMSNorm and the LM head (or the tied embedding) -> float32 logits.
    Tokens: integer ids [B, S] (float tokens are a TypeError). Outside ``jit``
    an id outside [0, vocab_size) is a ValueError naming it; under ``jit`` ids
    cannot be checked and follow ``jnp.take``: an id >= vocab_size embeds as
    NaN (NaN logits for it and, through attention and routing, for others), a
    negative one counts from the end of the vocabulary.
    Returns (logits [B, S, V], aux) where aux sums the router losses of the MoE
    layers ('aux_loss', 'z_loss', 'router_loss'), averages 'dropped_fraction',
    and stacks 'expert_load' as [num_moe_layers, E].
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Param(nnx.initializers.normal(stddev=1.0)(
            rngs.params(), (cfg.vocab_size, cfg.d_model), jnp.float32), logical_axes=("vocab", "embed"))
        self.layers = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.n_layers)])
        self.final_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        if not cfg.tie_embeddings:
            self.lm_head = nnx.Param(nnx.initializers.normal(stddev=cfg.d_model ** -0.5)(
                rngs.params(), (cfg.d_model, cfg.vocab_size), jnp.float32),
                logical_axes=("embed", "vocab"))

    def __call__(self, tokens_BS: Int[Array, "B S"], positions_BS: Int[Array, "B S"] | None = None
                 ) -> tuple[Float[Array, "B S V"], dict]:
        cfg = self.cfg
        validate.token_ids(tokens_BS, cfg.vocab_size)
        if positions_BS is None:
            positions_BS = jnp.broadcast_to(jnp.arange(tokens_BS.shape[1], dtype=jnp.int32),
                                            tokens_BS.shape)
        # gather rows from a table whole along embed (FSDP-gathered): a lookup
        # into an embed-split table cannot be re-split over batch efficiently
        embed_VD = sharding.constrain(self.embed[...], ("vocab", None))
        x_BSD = jnp.take(embed_VD, tokens_BS, axis=0)
        x_BSD = sharding.constrain(x_BSD, ("batch", "seq", "embed"))
        layer_aux = []
        for block in self.layers:
            x_BSD, aux = block(x_BSD, positions_BS)
            if aux is not None:
                layer_aux.append(aux)
        x_BSD = self.final_norm(x_BSD)
        head_DV = self.embed[...].T if cfg.tie_embeddings else self.lm_head[...]
        logits_BSV = jnp.einsum("bsd,dv->bsv", x_BSD.astype(jnp.float32), head_DV)
        return sharding.constrain(logits_BSV, ("batch", "seq", "vocab")), _merge_aux(layer_aux)

    @property
    def moe_layers(self) -> list[MoE]:
        return [block.ffn for block in self.layers if block.is_moe]

    def update_router_biases(self, expert_load_LE: Float[Array, "L E"]) -> None:
        """Aux-loss-free balancing for every MoE layer, from aux['expert_load']."""
        for i, moe in enumerate(self.moe_layers):
            moe.update_bias(expert_load_LE[i])


def _merge_aux(layer_aux: list[dict]) -> dict:
    zero = jnp.zeros((), jnp.float32)
    if not layer_aux:
        return {"aux_loss": zero, "z_loss": zero, "router_loss": zero, "dropped_fraction": zero,
                "ep_overflow": zero, "dispatch_bytes": zero, "dispatch_min_bytes": zero,
                "expert_load": jnp.zeros((0, 0), jnp.float32)}
    total = lambda key: sum(a[key] for a in layer_aux)  # noqa: E731
    return {
        "aux_loss": total("aux_loss"),
        "z_loss": total("z_loss"),
        "router_loss": total("router_loss"),
        "dropped_fraction": total("dropped_fraction") / len(layer_aux),
        # expert-parallel exchange: summed over the MoE layers (forward pass)
        **{key: total(key) for key in ("ep_overflow", "dispatch_bytes", "dispatch_min_bytes")
           if all(key in a for a in layer_aux)},
        "expert_load": jnp.stack([a["expert_load"] for a in layer_aux]),
    }

