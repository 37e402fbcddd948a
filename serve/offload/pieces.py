"""Jitted per-layer pieces of the Transformer forward, for the layer-by-layer offloaded path.

Each piece takes the graph definition of the submodules it needs (static: one
compile per distinct structure, shared by layers alike) and their state, so
the routed experts never enter a jitted function except through the slot
pool. They mirror ``moejax.model.Block`` and ``moejax.moe.MoE`` step by step;
tests compare the assembled forward with the model's own.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import decode_cache
from moejax import dispatch as dispatch_lib
from moejax.layers import LayerContext


def on_device(tree):
    """``tree`` committed to the device the expert copies go to. Every array the pieces see
    is then placed alike from the first step on: jit keys its compiles on placement, and a
    fresh (uncommitted) array beside a copied (committed) one would compile each piece
    once more at the steps where that mix changes."""
    from serve.offload.store import device_sharding
    return jax.device_put(tree, device_sharding())


def split(*modules):
    """(graphdef, state on the device) of a tuple of submodules (None entries allowed)."""
    graphdef, state = nnx.split(tuple(modules))
    return graphdef, on_device(state)


@partial(jax.jit, static_argnums=0, donate_argnames="cache")
def attention(gdef, state, x_BSD, positions_BS, cache=None, valid_BS=None):
    """x + attn(attn_norm(x)) and ffn_norm of that: (x_mid, h, the layer's attention cache)."""
    attn_norm, attn, ffn_norm = nnx.merge(gdef, state)
    out_BSD, cache = attn(attn_norm(x_BSD), positions_BS, cache=cache, valid_BS=valid_BS)
    x_BSD = x_BSD + out_BSD.astype(x_BSD.dtype)
    return x_BSD, ffn_norm(x_BSD), cache


def _ffn_call(ffn, h_BSD, tokens_BS, positions_BS, valid_BS, prev_tokens_BN, ffn_state):
    """An FFN kind under the FFN protocol -> (y, its decode state after the call)."""
    ctx = LayerContext(tokens_BS=tokens_BS, positions_BS=positions_BS, valid_BS=valid_BS,
                       prev_tokens_BN=prev_tokens_BN, state=ffn_state)
    y_BSD, _ = ffn(h_BSD, ctx)
    return y_BSD, ffn_state if ctx.new_state is None else ctx.new_state


@partial(jax.jit, static_argnums=0)
def dense_ffn(gdef, state, x_BSD, h_BSD, tokens_BS, positions_BS, valid_BS=None,
              prev_tokens_BN=None, ffn_state=None):
    """A non-MoE FFN kind (memory layers too) plus the residual -> (x, its decode state).

    ``prev_tokens_BN`` / ``ffn_state``: what ``Transformer.extend`` hands the kind in
    decoding (the ids before the chunk, the kind's own state); None in a full forward."""
    (ffn,) = nnx.merge(gdef, state)
    y_BSD, ffn_state = _ffn_call(ffn, h_BSD, tokens_BS, positions_BS, valid_BS, prev_tokens_BN,
                                 ffn_state)
    return x_BSD + y_BSD.astype(x_BSD.dtype), ffn_state


@partial(jax.jit, static_argnums=0)
def side_ffn(gdef, state, h_BSD, tokens_BS, positions_BS, valid_BS=None, prev_tokens_BN=None,
             ffn_state=None):
    """The memory beside an MoE ('engram+moe', 'pkm+moe') -> (its output, its decode state);
    :func:`moe_output` adds it to the MoE's as ``MemoryBeside`` does."""
    (ffn,) = nnx.merge(gdef, state)
    return _ffn_call(ffn, h_BSD, tokens_BS, positions_BS, valid_BS, prev_tokens_BN, ffn_state)


@partial(jax.jit, static_argnums=0)
def route(gdef, state, h_BSD):
    """The MoE block's router on its normed input -> (gates_TK, experts_TK)."""
    (router,) = nnx.merge(gdef, state)
    batch, seq, d_model = h_BSD.shape
    gates_TK, experts_TK, _ = router(h_BSD.reshape(batch * seq, d_model), num_sequences=batch)
    return gates_TK, experts_TK


@partial(jax.jit, static_argnums=(1, 2))
def capacity_keep(experts_TK, num_experts: int, capacity_factor: float):
    """[T, K] bool: the pairs 'capacity' dispatch keeps (``moejax.dispatch.capacity_dispatch``:
    the step's T tokens, padding included, fill per-expert buffers slot-major)."""
    num_tokens, top_k = experts_TK.shape
    capacity = dispatch_lib.expert_capacity(num_tokens, top_k, num_experts, capacity_factor)
    return dispatch_lib.capacity_positions(experts_TK, num_experts) < capacity


def pick_probability(ffn_norm, router, x_BSD):
    """Prefetch guess per token [B, S, E]: the chance the token's router picks each expert.

    The block's ffn_norm + router applied to an earlier hidden state (see
    :func:`predict`). The router's probabilities p (softmax, or sigmoid scores
    plus the selection bias, normalised) become ``min(1, top_k * p)``: an
    expert holding 1/top_k of the mass is about sure to be among the top_k.
    Ranking experts by the chance that any token of the step picks one of them
    (:func:`predict`) beat ranking by summed top-2k router scores on both
    trained models of ``benchmarks/RESULTS.md`` (64 experts, top-8, with the
    recent-use term of ``SlotTable.prefetch``: 0.87 -> 0.89 of Belady).
    """
    cfg = router.cfg
    h_BSD = ffn_norm(x_BSD)
    logits_BSE = jnp.einsum("bsd,de->bse", h_BSD.astype(jnp.float32), router.kernel[...],
                            precision=jax.lax.Precision.HIGHEST)
    if cfg.router == "softmax":
        p_BSE = jax.nn.softmax(logits_BSE, axis=-1)
    else:
        s_BSE = jnp.maximum(jax.nn.sigmoid(logits_BSE) + router.bias[...][None, None, :], 0.0)
        p_BSE = s_BSE / jnp.maximum(s_BSE.sum(axis=-1, keepdims=True), 1e-9)
    return jnp.minimum(1.0, cfg.top_k * p_BSE)


def any_pick(q_TE, valid_T):
    """[E]: the chance that at least one valid token picks each expert (tokens independent)."""
    log_miss_TE = jnp.where(valid_T[:, None], jnp.log1p(-jnp.minimum(q_TE, 1.0 - 1e-7)), 0.0)
    return -jnp.expm1(log_miss_TE.sum(axis=0))


@partial(jax.jit, static_argnums=0)
def predict(gdef, state, x_BSD, carry_BD, positions_BS, valid_BS):
    """Prefetch prediction per expert [E] for one MoE block, before its attention runs.

    The router sees the block's input plus ``carry_BD``: the block's attention
    output at each row's previous position (:func:`next_carry`; attention
    outputs of neighbouring positions are alike; zero for a row starting a
    sequence). In an offline replay of the trained 64-expert model's routing
    this lifted the share of Belady's hit rate from 0.90 to 0.94
    (``benchmarks/RESULTS.md``, offloaded experts).
    """
    ffn_norm, router = nnx.merge(gdef, state)
    carry_BD = jnp.where(positions_BS[:, :1] == 0, 0.0, carry_BD)
    q_BSE = pick_probability(ffn_norm, router, x_BSD + carry_BD[:, None, :].astype(x_BSD.dtype))
    batch, seq, num_experts = q_BSE.shape
    return any_pick(q_BSE.reshape(batch * seq, num_experts), valid_BS.reshape(-1))


@jax.jit
def next_carry(carry_BD, x_in_BSD, x_mid_BSD, valid_BS):
    """Each row's attention output at its last valid position; rows with none keep theirs."""
    seq = x_in_BSD.shape[1]
    last_B = jnp.max(jnp.where(valid_BS, jnp.arange(seq)[None, :], -1), axis=1)
    attn_BSD = (x_mid_BSD - x_in_BSD).astype(carry_BD.dtype)
    picked_BD = jnp.take_along_axis(attn_BSD, jnp.maximum(last_B, 0)[:, None, None], axis=1)[:, 0]
    return jnp.where((last_B >= 0)[:, None], picked_BD, carry_BD)


@partial(jax.jit, static_argnums=0)
def moe_output(gdef, state, x_BSD, h_BSD, y_TKD, gates_TK, side_BSD=None):
    """Combine the routed outputs with the gates, add the shared experts (and ``side_BSD``,
    the output of a memory beside the MoE), add the residual."""
    shared, shared_gate = nnx.merge(gdef, state)
    batch, seq, d_model = h_BSD.shape
    x_TD = h_BSD.reshape(batch * seq, d_model)
    # the combine of moejax.dispatch.unpermute, in float32
    out_TD = jnp.einsum("tkd,tk->td", y_TKD.astype(jnp.float32),
                        gates_TK.astype(jnp.float32)).astype(y_TKD.dtype)
    if shared is not None:
        shared_TD = shared(x_TD)
        if shared_gate is not None:
            gate_T1 = jax.nn.sigmoid(x_TD.astype(jnp.float32) @ shared_gate[...])
            shared_TD = (shared_TD.astype(jnp.float32) * gate_T1).astype(y_TKD.dtype)
        out_TD = out_TD + shared_TD
    y_BSD = out_TD.reshape(batch, seq, d_model).astype(h_BSD.dtype)
    if side_BSD is not None:          # moejax.memory.kinds.MemoryBeside: memory + MoE
        y_BSD = side_BSD + y_BSD.astype(side_BSD.dtype)
    return x_BSD + y_BSD.astype(x_BSD.dtype)


@partial(jax.jit, static_argnums=0)
def head(gdef, state, x_BSD):
    """Final norm and LM head (or tied embedding) -> float32 logits."""
    final_norm, head_DV, embed_VD = nnx.merge(gdef, state)
    x_BSD = final_norm(x_BSD)
    w_DV = embed_VD[...].T if head_DV is None else head_DV[...]
    return jnp.einsum("bsd,dv->bsv", x_BSD.astype(jnp.float32), w_DV)


@jax.jit
def embed(embed_VD, tokens_BS):
    return jnp.take(embed_VD, tokens_BS, axis=0)


@partial(jax.jit, static_argnums=2)
def previous_tokens(tokens_BT, positions_BS, num: int):
    """The ``num`` ids before each row's first position of the step, -1 where the row has
    none (a row restarting at position 0 sees none of the request the slot held before)."""
    return decode_cache.previous_tokens(tokens_BT, positions_BS[:, 0], num)


record_tokens = jax.jit(decode_cache.record_tokens)   # the step's valid ids into the history
