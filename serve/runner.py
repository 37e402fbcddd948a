"""The model-facing half of the engine: one jitted step over a fixed batch of slots.

A step takes, for every slot (row) b, ``lengths_B[b]`` new tokens in
``tokens_BS[b, :lengths_B[b]]`` (0 for an idle row, 1 for a decoding row, up
to S for a prefill chunk) and ``reset_B[b]`` (the row starts a new request:
forget what it held). It returns the next token of every row, sampled from
the logits after the row's last new token, and the updated per-row state.
Shapes are fixed by (slots, S), so the step compiles once per S bucket.

The per-row state is the model's own decode cache (``model.init_cache`` /
``model.extend``): KV or latent entries, lengths and token history per row.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from serve.sampling import sample


def _last_logits(logits_BSV, index_B):
    """logits at position index_B[b] of each row (clamped to 0 for idle rows)."""
    index_B = jnp.maximum(index_B, 0)
    return jnp.take_along_axis(logits_BSV, index_B[:, None, None], axis=1)[:, 0]


class CacheRunner:
    """The model's own cache: ``extend`` appends each row's new tokens."""

    name = "cache"

    def __init__(self, num_slots: int, max_len: int, max_chunk: int):
        self.num_slots, self.max_len, self.max_chunk = num_slots, max_len, max_chunk

    def init_state(self, model):
        return model.init_cache(batch_size=self.num_slots, max_len=self.max_len)

    def forward(self, model, cache, tokens_BS, lengths_B, reset_B):
        cache = reset_rows(cache, reset_B)
        logits_BSV, cache = model.extend(tokens_BS, cache, lengths_B)
        return _last_logits(logits_BSV, lengths_B - 1), cache


def reset_rows(cache, reset_B):
    """The cache with rows marked in reset_B emptied (length 0, no token history).

    Attention entries past a row's length are never read, so only the lengths
    and the token history have to change.
    """
    lengths_B = jnp.where(reset_B, 0, cache.lengths_B)
    changes: dict[str, Any] = {"lengths_B": lengths_B}
    if getattr(cache, "tokens_BT", None) is not None:
        changes["tokens_BT"] = jnp.where(reset_B[:, None], -1, cache.tokens_BT)
    return dataclasses.replace(cache, **changes)


def make_runner(model, num_slots: int, max_len: int, max_chunk: int, factory=None):
    """The model's cache runner; ``factory(num_slots, max_len, max_chunk)`` builds another
    (the expert store's layer-by-layer runner, ``serve.offload``)."""
    if factory is not None:
        return factory(num_slots, max_len, max_chunk)
    if not (hasattr(model, "init_cache") and hasattr(model, "extend")):
        raise TypeError(f"{type(model).__name__} has no init_cache/extend: it cannot decode")
    return CacheRunner(num_slots, max_len, max_chunk)


def compile_step(graphdef, runner):
    """The jitted step: (model state, runner state, step inputs) -> (next tokens, runner state).

    The runner state is donated (updated in place); model weights are an
    argument, not a constant, so they are neither copied nor folded.
    """
    def step(model_state, runner_state, tokens_BS, lengths_B, reset_B, temperature_B, top_p_B,
             top_k_B, seed_B2, index_B):
        model = nnx.merge(graphdef, model_state)
        logits_BV, runner_state = runner.forward(model, runner_state, tokens_BS, lengths_B, reset_B)
        next_B = sample(logits_BV, temperature_B, top_p_B, top_k_B, seed_B2, index_B)
        return next_B, runner_state

    return jax.jit(step, donate_argnums=(1,))
