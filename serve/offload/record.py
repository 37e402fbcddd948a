"""Record the routing of real generations as a :class:`RoutingTrace`.

Causal routing at a position does not depend on later tokens, so one full
forward over the finished sequences gives the routing every cached engine
step saw. This module generates greedily, runs that forward while keeping
each MoE layer's chosen experts (and the prefetch prediction for it, as the
engine makes it: ``pieces.pick_probability`` on the hidden state entering
the block plus the block's attention output at the row's position of the
previous step), then groups positions into the steps of a static batch:
prefill chunks, then one decode position per row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.layers import LayerContext
from serve.offload import pieces
from serve.offload.offloaded import moe_of
from serve.offload.trace import RoutingTrace


@nnx.jit
def _routing(model, tokens_BT, carry_from_BT):
    """(logits, experts [L, B, T, K], pick chances [L, B, T, E]) of the full forward.

    ``carry_from_BT``: the position whose attention output the prediction at
    (b, t) adds (the row's last position of an earlier step; -1: none).
    """
    batch, seq = tokens_BT.shape
    positions_BT = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    x = jnp.take(model.embed[...], tokens_BT, axis=0)
    blocks = list(model.layers)

    def top(block, moe, x_BTD):
        h = block.ffn_norm(x_BTD).reshape(batch * seq, -1)
        return moe.router(h, num_sequences=batch)[1].reshape(batch, seq, -1)

    chosen, predicted = [], []
    for block in blocks:
        attn_BTD = block.attn(block.attn_norm(x), positions_BT)[0].astype(x.dtype)
        parts = moe_of(block.ffn)
        if parts is not None:      # the prefetch guess: from the block's input
            carry_BTD = jnp.take_along_axis(attn_BTD, jnp.maximum(carry_from_BT, 0)[..., None], axis=1)
            carry_BTD = jnp.where((carry_from_BT >= 0)[..., None], carry_BTD, 0.0)
            predicted.append(pieces.pick_probability(block.ffn_norm, parts[0].router, x + carry_BTD))
        x = x + attn_BTD
        h = block.ffn_norm(x)
        if parts is not None:
            chosen.append(top(block, parts[0], x))
        y, _ = block.ffn(h, LayerContext(tokens_BS=tokens_BT, positions_BS=positions_BT))
        x = x + y.astype(x.dtype)
    x = model.final_norm(x)
    head = model.embed[...].T if model.cfg.tie_embeddings else model.lm_head[...]
    logits = jnp.einsum("btd,dv->btv", x.astype(jnp.float32), head)
    return logits, jnp.stack(chosen), jnp.stack(predicted)


@nnx.jit
def _logits(model, tokens_BT):
    return model(tokens_BT)[0]


def greedy(model, prompts: list[list[int]], max_new_tokens: int) -> np.ndarray:
    """Greedy continuations by full forwards over one fixed-width buffer -> tokens [B, W]."""
    width = max(len(p) for p in prompts) + max_new_tokens
    tokens = np.zeros((len(prompts), width), np.int32)
    lengths = np.array([len(p) for p in prompts])
    for b, p in enumerate(prompts):
        tokens[b, :len(p)] = p
    for n in range(max_new_tokens):
        logits = np.asarray(_logits(model, jnp.asarray(tokens)))
        pos = lengths + n
        tokens[np.arange(len(prompts)), pos] = logits[np.arange(len(prompts)), pos - 1].argmax(-1)
    return tokens


def steps_of_batch(lengths: list[int], new_tokens: int, chunk: int) -> list[list[tuple[int, int]]]:
    """(row, position) pairs of each engine step: prefill chunks, then decode steps."""
    steps = []
    for start in range(0, max(lengths), chunk):
        steps.append([(b, t) for b, n in enumerate(lengths) for t in range(start, min(start + chunk, n))])
    for n in range(new_tokens - 1):          # the last generated token is never fed back
        steps.append([(b, length + n) for b, length in enumerate(lengths)])
    return steps


def carry_sources(steps: list[list[tuple[int, int]]], shape) -> np.ndarray:
    """[B, T]: for each (row, position) of a step, the row's last position of an earlier step
    (-1: none), as the engine's prefetch carries it (``pieces.next_carry``)."""
    source_BT = np.full(shape, -1, np.int32)
    last_B = np.full(shape[0], -1, np.int32)
    for pairs in steps:
        for b, t in pairs:
            source_BT[b, t] = last_B[b]
        for b, t in pairs:
            last_B[b] = max(last_B[b], t)
    return source_BT


def record(model, prompts: list[list[int]], *, max_new_tokens: int = 32, batch_size: int = 4,
           chunk: int = 64) -> RoutingTrace:
    """Generate for ``prompts`` in static batches and return the routing trace of those steps."""
    moe = next(parts[0] for parts in map(moe_of, (b.ffn for b in model.layers)) if parts is not None)
    num_experts, top_k = moe.cfg.num_experts, moe.cfg.top_k
    need, pred, tokens_N = [], [], []
    for first in range(0, len(prompts), batch_size):
        batch = prompts[first:first + batch_size]
        tokens = greedy(model, batch, max_new_tokens)
        steps = steps_of_batch([len(p) for p in batch], max_new_tokens, chunk)
        sources = jnp.asarray(carry_sources(steps, tokens.shape))
        _, chosen_LBTK, pick_LBTE = (np.asarray(a) for a in _routing(model, jnp.asarray(tokens), sources))
        for pairs in steps:
            rows, pos = np.array(pairs).T
            need.append(np.stack([np.bincount(chosen_LBTK[layer, rows, pos].reshape(-1),
                                              minlength=num_experts)
                                  for layer in range(chosen_LBTK.shape[0])]))
            every = jnp.ones(len(pairs), bool)
            chance_LE = np.stack([np.asarray(pieces.any_pick(jnp.asarray(q_TE), every))
                                  for q_TE in pick_LBTE[:, rows, pos]])
            pred.append(np.round(chance_LE * 1000).astype(np.int32))
            tokens_N.append(len(pairs))
    return RoutingTrace(np.stack(need), np.array(tokens_N), top_k, np.stack(pred))
