"""Device slots of one MoE layer and the slot-indexed expert compute.

The pool is the layer's experts tensors with S instead of E rows
(``{name: [S, ...]}``); a copy writes one expert into one slot in place
(donated buffers). The compute of a wave is the dropless sorted dispatch
with expert ids remapped to slot ids: pairs whose expert is not in this
wave's slots (or whose token is padding) sort past the last group, where the
grouped matmul gives zeros, and keep the output an earlier wave wrote. All
shapes are fixed by (tokens, top_k, S), so nothing recompiles as the table
changes.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from moejax import dispatch as dispatch_lib
from moejax.experts import view_of
from serve.offload import pieces


class SlotPool:
    """S device slots for one layer's experts: ``arrays[name]`` is [S, *expert_shape]."""

    def __init__(self, shapes: dict[str, tuple[tuple[int, ...], np.dtype]], num_slots: int):
        self.num_slots = num_slots
        self.arrays = pieces.on_device({n: jnp.zeros((num_slots, *shape), dtype)
                                        for n, (shape, dtype) in shapes.items()})

    def load(self, slot: int, expert_arrays: dict[str, jax.Array]) -> None:
        self.arrays = _write_slot(self.arrays, jnp.int32(slot), expert_arrays)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


@partial(jax.jit, donate_argnums=0)
def _write_slot(pool, slot, expert_arrays):
    return {n: pool[n].at[slot].set(expert_arrays[n].astype(pool[n].dtype)) for n in pool}


def slot_experts(pool: dict[str, jax.Array], dtype):
    """The slot-cached experts object: the experts' own weights view (float or int8) over
    the S slots."""
    return view_of(pool, dtype)


@partial(jax.jit, static_argnames=("gmm_backend",), donate_argnums=(4,))
def wave_compute(pool, x_TD, experts_TK, valid_T, y_TKD, slot_E, *, gmm_backend: str):
    """Expert outputs of the pairs whose expert sits in a slot this wave -> y_TKD updated.

    slot_E: [E] int32, the slot of each expert computed in this wave, -1 otherwise.
    """
    num_tokens, top_k = experts_TK.shape
    num_slots = next(iter(pool.values())).shape[0]
    slot_TK = slot_E[experts_TK]
    active_TK = (slot_TK >= 0) & valid_T[:, None]
    plan = dispatch_lib.plan_sort(jnp.where(active_TK, slot_TK, num_slots), num_slots + 1)
    x_MD = dispatch_lib.permute(x_TD, plan, top_k)
    y_MD = slot_experts(pool, y_TKD.dtype)(x_MD, plan.group_sizes_E[:num_slots], backend=gmm_backend)
    y_new = dispatch_lib.take_rows(y_MD, plan.inverse_M, plan.order_M).reshape(num_tokens, top_k, -1)
    return jnp.where(active_TK[:, :, None], y_new.astype(y_TKD.dtype), y_TKD)
