"""Decoder-only Transformer assembled from attention, MoE and dense FFN blocks."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from moejax import sharding
from moejax.attention import Attention, MLAttention, RMSNorm
from moejax.config import ModelConfig
from moejax.layers import LayerAux, LayerContext, build_ffn
from moejax.moe import MoE


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x), ctx).

    The FFN is whatever kind ``cfg.ffn_kinds[layer]`` names (``moejax.layers``):
    every kind is called the same way and returns ``(y, LayerAux)``.
    """

    def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.attn = MLAttention(cfg, rngs=rngs) if cfg.mla is not None else Attention(cfg, rngs=rngs)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.ffn = build_ffn(cfg, layer, rngs=rngs)

    def __call__(self, x_BSD, ctx: LayerContext) -> tuple[Array, LayerAux]:
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), ctx.positions_BS).astype(x_BSD.dtype)
        x_BSD = sharding.constrain(x_BSD, ("batch", "seq", "embed"))
        h_BSD = self.ffn_norm(x_BSD)
        y_BSD, aux = self.ffn(h_BSD, ctx)
        x_BSD = x_BSD + y_BSD.astype(x_BSD.dtype)
        return sharding.constrain(x_BSD, ("batch", "seq", "embed")), aux


class Transformer(nnx.Module):
    """Decoder-only language model.

    1. Embed tokens [B, S] -> [B, S, D] (float32 residual stream).
    2. n_layers pre-norm blocks (attention with RoPE; the FFN kind of each layer).
    3. Final RMSNorm and the LM head (or the tied embedding) -> float32 logits.
    Returns (logits [B, S, V], aux) where aux is the layers' LayerAux reduced
    over layers (``LayerAux.reduce``): router losses summed, 'dropped_fraction'
    averaged over the MoE layers, 'expert_load' stacked as [num_moe_layers, E].
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
                 ) -> tuple[Float[Array, "B S V"], LayerAux]:
        cfg = self.cfg
        if tokens_BS.ndim != 2:
            raise ValueError(f"tokens must be [batch, seq], got shape {tokens_BS.shape}")
        if positions_BS is None:
            positions_BS = jnp.broadcast_to(jnp.arange(tokens_BS.shape[1], dtype=jnp.int32),
                                            tokens_BS.shape)
        # gather rows from a table whole along embed (FSDP-gathered): a lookup
        # into an embed-split table cannot be re-split over batch efficiently
        embed_VD = sharding.constrain(self.embed[...], ("vocab", None))
        x_BSD = jnp.take(embed_VD, tokens_BS, axis=0)
        x_BSD = sharding.constrain(x_BSD, ("batch", "seq", "embed"))
        ctx = LayerContext(tokens_BS=tokens_BS, positions_BS=positions_BS)
        layer_aux = []
        for block in self.layers:
            x_BSD, aux = block(x_BSD, ctx)
            layer_aux.append(aux)
        x_BSD = self.final_norm(x_BSD)
        head_DV = self.embed[...].T if cfg.tie_embeddings else self.lm_head[...]
        logits_BSV = jnp.einsum("bsd,dv->bsv", x_BSD.astype(jnp.float32), head_DV)
        return sharding.constrain(logits_BSV, ("batch", "seq", "vocab")), LayerAux.reduce(layer_aux)

    @property
    def moe_layers(self) -> list[MoE]:
        """The MoE blocks in layer order (the rows of aux['expert_load']), also those that
        sit inside another FFN kind (e.g. a memory layer beside an MoE, 'engram+moe')."""
        return [m for block in self.layers for _, m in nnx.iter_graph(block.ffn) if isinstance(m, MoE)]

    def update_router_biases(self, expert_load_LE: Float[Array, "L E"]) -> None:
        """Aux-loss-free balancing for every MoE layer, from aux['expert_load']."""
        for i, moe in enumerate(self.moe_layers):
            moe.update_bias(expert_load_LE[i])

