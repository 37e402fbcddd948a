"""The model-facing half of the engine: one jitted step over a fixed batch of slots.

A step takes, for every slot (row) b, ``lengths_B[b]`` new tokens in
``tokens_BS[b, :lengths_B[b]]`` (0 for an idle row, 1 for a decoding row, up
to S for a prefill chunk) and ``reset_B[b]`` (the row starts a new request:
forget what it held). It returns the next token of every row, sampled from
the logits after the row's last new token, and the updated per-row state.
Shapes are fixed by (rows, S), so the step compiles once per (row bucket,
S bucket). A step over B rows of a cache of more slots works on the cache's
first B rows (sliced out and written back in place): idle slots past the
last busy one cost nothing.

The per-row state is the model's own decode cache (``model.init_cache`` /
``model.extend``): KV or latent entries, lengths and token history per row.
"""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable

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
    row_buckets = True   # a step may cover the first B < num_slots rows

    def __init__(self, num_slots: int, max_len: int, max_chunk: int):
        self.num_slots, self.max_len, self.max_chunk = num_slots, max_len, max_chunk
        self._row_axes = None

    def init_state(self, model):
        self._row_axes = row_axes(lambda b: model.init_cache(batch_size=b, max_len=self.max_len),
                                  self.num_slots)
        return model.init_cache(batch_size=self.num_slots, max_len=self.max_len)

    def forward(self, model, cache, tokens_BS, lengths_B, reset_B):
        rows = tokens_BS.shape[0]
        part = cache if rows == self.num_slots else take_rows(cache, self._row_axes, rows)
        part = reset_rows(part, reset_B)
        logits_BSV, part = model.extend(tokens_BS, part, lengths_B)
        cache = part if rows == self.num_slots else put_rows(cache, part, self._row_axes)
        return _last_logits(logits_BSV, lengths_B - 1), cache


def row_axes(make_state, num_slots: int):
    """Per leaf of ``make_state(num_slots)``: its row (batch) axis, -1 for a leaf that has
    none. Found by shape alone (``make_state(num_slots + 1)`` differs there), so it holds
    for stacked (scanned) layer caches and any FFN kind's decode state."""
    full, more = (jax.eval_shape(lambda n=n: make_state(n)) for n in (num_slots, num_slots + 1))
    return jax.tree.map(lambda x, y: next((i for i, (a, b) in enumerate(zip(x.shape, y.shape)) if a != b), -1),
                        full, more)


def take_rows(state, axes, rows: int):
    """The state of the first ``rows`` rows."""
    return jax.tree.map(lambda x, a: x if a < 0 else jax.lax.slice_in_dim(x, 0, rows, axis=a), state, axes)


def put_rows(state, part, axes):
    """``state`` with its first rows replaced by ``part`` (in place under donation)."""
    return jax.tree.map(lambda x, p, a: p if a < 0 else jax.lax.dynamic_update_slice_in_dim(x, p, 0, a),
                        state, part, axes)


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


def precompile(step_fn, arg_sets: Iterable[tuple]) -> None:
    """Compile the jitted ``step_fn`` for each argument set, several at once.

    Tracing and lowering hold the GIL, so they run one by one here; XLA compiles
    without it, so each lowered step compiles on a pool thread while the next one
    lowers. Later calls with those shapes find them compiled. A step made in Python
    (no ``lower``) is left alone: its runner compiles its own pieces.
    """
    lower = getattr(step_fn, "lower", None)
    if lower is None:
        return
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for compiled in [pool.submit(lower(*args).compile) for args in arg_sets]:
            compiled.result()
