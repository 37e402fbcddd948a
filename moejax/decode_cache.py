"""The decode cache: what ``Transformer.extend`` carries from one call to the next.

B batch, T max_len (cache slots), N token look-back of the FFN kinds.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Cache:
    """A registered pytree; build it with ``model.init_cache(batch_size, max_len)``.

    - ``lengths_B``: how many tokens each row holds (int32).
    - ``tokens_BT``: the token ids so far, -1 in unused slots (FFN kinds that
      look back at previous ids read them from here).
    - ``layers``: one entry per block of the model (per scanned group, stacked
      on a leading layer axis, when ``ModelConfig.scan_layers``), each a dict
      ``{"attn": attention cache, "ffn": the FFN kind's decode state or None}``.
    """

    lengths_B: Int[Array, "B"]
    tokens_BT: Int[Array, "B T"]
    layers: tuple[Any, ...]

    @property
    def batch_size(self) -> int:
        return self.tokens_BT.shape[0]

    @property
    def max_len(self) -> int:
        return self.tokens_BT.shape[1]

    def nbytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self))


def previous_tokens(tokens_BT: Int[Array, "B T"], lengths_B: Int[Array, "B"], n: int
                    ) -> Int[Array, "B N"]:
    """The n ids just before each row's current length, -1 where the row has none."""
    index_BN = lengths_B[:, None] - n + jnp.arange(n, dtype=jnp.int32)[None, :]
    ids_BN = jnp.take_along_axis(tokens_BT, jnp.clip(index_BN, 0, tokens_BT.shape[1] - 1), axis=1)
    return jnp.where(index_BN >= 0, ids_BN, -1)


def record_tokens(tokens_BT: Int[Array, "B T"], tokens_BS: Int[Array, "B S"], positions_BS: Int[Array, "B S"],
                  valid_BS: Bool[Array, "B S"] | None = None) -> Int[Array, "B T"]:
    """The token history with the chunk's real ids written at their positions (padding and
    positions past the end are dropped)."""
    slot_BS = positions_BS if valid_BS is None else jnp.where(valid_BS, positions_BS, tokens_BT.shape[1])
    return tokens_BT.at[jnp.arange(tokens_BS.shape[0])[:, None], slot_BS].set(tokens_BS, mode="drop")


def check_room(cache: Cache, added_B: Int[Array, "B"]) -> None:
    """Clear error when the new tokens would overflow the cache (only when values are concrete;
    under jit, writes past the end are dropped: callers that trace must check themselves)."""
    if any(isinstance(x, jax.core.Tracer) for x in (cache.lengths_B, added_B)):
        return
    lengths, added = jax.device_get((cache.lengths_B, added_B))
    over = [(b, int(lengths[b]), int(added[b])) for b in range(len(lengths))
            if lengths[b] + added[b] > cache.max_len]
    if over:
        b, have, add = over[0]
        raise ValueError(f"extend: row {b} holds {have} tokens and gets {add} more, past the cache's "
                         f"max_len={cache.max_len} ({len(over)} row(s) overflow); "
                         "build the cache with a larger max_len")


def valid_mask(lengths_B: Int[Array, "B"] | None, batch: int, seq: int
               ) -> tuple[Bool[Array, "B S"] | None, Int[Array, "B"]]:
    """(valid_BS or None when every token is real, how many tokens each row adds).

    ``lengths_B`` must lie in [0, seq]: outside ``jit`` anything else is a ValueError
    naming the row; under ``jit`` it is clipped to that range."""
    if lengths_B is None:
        return None, jnp.full((batch,), seq, jnp.int32)
    lengths_B = jnp.asarray(lengths_B)
    if not jnp.issubdtype(lengths_B.dtype, jnp.integer):   # a cast would turn 2.7 into 2, True into 1
        raise TypeError(f"extend: lengths_B must hold integer counts, got dtype {lengths_B.dtype}")
    lengths_B = lengths_B.astype(jnp.int32)
    if lengths_B.shape != (batch,):
        raise ValueError(f"extend: lengths_B must have shape ({batch},), got {lengths_B.shape}")
    if not isinstance(lengths_B, jax.core.Tracer):
        bad = [(b, int(n)) for b, n in enumerate(jax.device_get(lengths_B)) if not 0 <= n <= seq]
        if bad:
            raise ValueError(f"extend: lengths_B[{bad[0][0]}]={bad[0][1]} is outside [0, {seq}] "
                             f"(the number of real tokens among the S={seq} given)")
    # under jit values cannot be checked: clip, so a row never counts tokens it did not get
    lengths_B = jnp.clip(lengths_B, 0, seq)
    return jnp.arange(seq, dtype=jnp.int32)[None, :] < lengths_B[:, None], lengths_B
