"""Token dispatch: permute / unpermute, group sizes, capacity; the expert backends.

Shapes: T tokens, K = top_k, M = T*K (token, slot) rows, E experts, C capacity
per expert, D model width, F expert hidden width.

Every backend computes the same function
``y_t = sum_k gate_tk * expert_{e_tk}(x_t)`` (minus dropped pairs for
``capacity``); ``dense`` is the reference the others are tested against.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from moejax import sharding


class SortPlan(NamedTuple):
    """Where each (token, slot) pair sits once the pairs are sorted by expert."""

    order_M: Int[Array, "M"]        # sorted row r holds flat pair order_M[r] (= t*K + k)
    inverse_M: Int[Array, "M"]      # flat pair f sits at sorted row inverse_M[f]
    group_sizes_E: Int[Array, "E"]  # rows per expert, in expert order


def plan_sort(experts_TK: Int[Array, "T K"], num_experts: int) -> SortPlan:
    """Stable sort of the (token, slot) pairs by expert id."""
    flat_M = experts_TK.reshape(-1).astype(jnp.int32)
    order_M = jnp.argsort(flat_M, stable=True).astype(jnp.int32)
    inverse_M = jnp.argsort(order_M).astype(jnp.int32)
    group_sizes_E = jnp.bincount(flat_M, length=num_experts).astype(jnp.int32)
    return SortPlan(order_M, inverse_M, group_sizes_E)


@jax.custom_vjp
def take_rows(x_MD: Array, perm_M: Int[Array, "M"], inverse_M: Int[Array, "M"]) -> Array:
    """``x[perm]`` for a permutation; the backward is the inverse gather.

    Autodiff of a gather is a scatter-add, which is slow on XLA:CPU; for a
    permutation the transpose is simply a gather with the inverse.
    """
    return x_MD[perm_M]


def _take_rows_fwd(x_MD, perm_M, inverse_M):
    return x_MD[perm_M], (perm_M, inverse_M)


def _take_rows_bwd(residuals, g_MD):
    perm_M, inverse_M = residuals
    return g_MD[inverse_M], None, None


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


@jax.custom_vjp
def gather_tokens(x_TD: Array, token_M: Int[Array, "M"], inverse_M: Int[Array, "M"]) -> Array:
    """``x[token]`` where sorted row r holds token ``token_M[r] = order_M[r] // K``.

    One gather from the T tokens, without first copying each token K times.
    The backward is a gather too (not autodiff's scatter-add, slow on
    XLA:CPU): pair f = t*K + k sits at sorted row ``inverse_M[f]``, so the
    token gradient is ``g[inverse].reshape(T, K, D).sum(1)``.
    """
    return x_TD[token_M]


def _gather_tokens_fwd(x_TD, token_M, inverse_M):
    return x_TD[token_M], (x_TD.shape[0], token_M, inverse_M)


def _gather_tokens_bwd(residuals, g_MD):
    num_tokens, token_M, inverse_M = residuals
    g_TKD = g_MD[inverse_M].reshape(num_tokens, -1, g_MD.shape[-1])
    return jnp.sum(g_TKD, axis=1, dtype=jnp.float32).astype(g_MD.dtype), None, None


gather_tokens.defvjp(_gather_tokens_fwd, _gather_tokens_bwd)


def permute(x_TD: Float[Array, "T D"], plan: SortPlan, top_k: int) -> Float[Array, "M D"]:
    """Every (token, slot) pair's token row, sorted by expert (a gather from the tokens)."""
    return gather_tokens(x_TD, plan.order_M // top_k, plan.inverse_M)


def unpermute(y_MD: Float[Array, "M D"], plan: SortPlan, gates_TK: Float[Array, "T K"]
              ) -> Float[Array, "T D"]:
    """Undo the sort and combine the k expert outputs with float32 gate weights."""
    num_tokens, top_k = gates_TK.shape
    y_TKD = take_rows(y_MD, plan.inverse_M, plan.order_M).reshape(num_tokens, top_k, -1)
    out_TD = jnp.einsum("tkd,tk->td", y_TKD.astype(jnp.float32), gates_TK.astype(jnp.float32))
    return out_TD.astype(y_MD.dtype)


def sorted_dispatch(x_TD, gates_TK, experts_TK, experts, *, gmm_backend: str):
    """Dropless: sort pairs by expert, grouped matmul (the experts' own), un-sort, combine."""
    plan = plan_sort(experts_TK, experts.num_experts)
    x_MD = permute(x_TD, plan, gates_TK.shape[1])
    y_MD = experts(x_MD, plan.group_sizes_E, backend=gmm_backend)
    return unpermute(y_MD, plan, gates_TK), jnp.zeros((), jnp.float32)


def dense_dispatch(x_TD, gates_TK, experts_TK, experts):
    """Reference: every expert on every token, weighted by the sparse gates."""
    num_tokens = x_TD.shape[0]
    gates_TE = jnp.zeros((num_tokens, experts.num_experts), jnp.float32).at[
        jnp.arange(num_tokens)[:, None], experts_TK].add(gates_TK.astype(jnp.float32))
    y_TED = experts.dense(x_TD)
    out_TD = jnp.einsum("ted,te->td", y_TED.astype(jnp.float32), gates_TE)
    return out_TD.astype(x_TD.dtype), jnp.zeros((), jnp.float32)


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """GShard capacity: ``ceil(capacity_factor * T * K / E)`` slots per expert, at most T.

    A token's K experts are distinct, so no expert receives more than T pairs:
    slots past T could never fill, and a large factor (cf >= E / K) would
    otherwise allocate [E, C, D] buffers that grow with the factor, not the batch.
    """
    return max(1, min(num_tokens, math.ceil(capacity_factor * num_tokens * top_k / num_experts)))


def capacity_positions(experts_TK: Int[Array, "T K"], num_experts: int
                       ) -> Int[Array, "T K"]:
    """Arrival position of each pair in its expert's queue.

    Priority is slot-major (every token's first choice before any second
    choice), tokens in order within a slot: deterministic, and first choices
    are the last to be dropped.
    """
    experts_KT = experts_TK.T
    one_hot_KTE = jax.nn.one_hot(experts_KT, num_experts, dtype=jnp.int32)
    arrivals_KTE = jnp.cumsum(one_hot_KTE.reshape(-1, num_experts), axis=0).reshape(
        one_hot_KTE.shape)
    position_KT = jnp.sum(arrivals_KTE * one_hot_KTE, axis=-1) - 1
    return position_KT.T


def capacity_dispatch(x_TD, gates_TK, experts_TK, experts, *, capacity_factor: float):
    """GShard-style: fixed per-expert buffers, pairs past capacity dropped.

    1. position of each pair in its expert's queue (slot-major priority).
    2. kept pairs are written to buffer slot ``e * C + position``; dropped
       pairs go to a spare row that nothing reads.
    3. experts run batched on [E, C, D] buffers; outputs are gathered back
       (dropped pairs read a zero row) and combined with the gates of the kept pairs.
    Returns (out_TD, dropped_fraction).
    """
    (num_tokens, top_k), num_experts = experts_TK.shape, experts.num_experts
    capacity = expert_capacity(num_tokens, top_k, num_experts, capacity_factor)
    position_TK = capacity_positions(experts_TK, num_experts)
    keep_TK = position_TK < capacity
    spare = num_experts * capacity
    slot_TK = jnp.where(keep_TK, experts_TK * capacity + position_TK, spare)
    token_TK = jnp.broadcast_to(jnp.arange(num_tokens)[:, None], slot_TK.shape)
    buffer_SD = jnp.zeros((spare + 1, x_TD.shape[1]), x_TD.dtype).at[slot_TK.reshape(-1)].set(
        x_TD[token_TK.reshape(-1)])
    x_ECD = buffer_SD[:spare].reshape(num_experts, capacity, -1)
    y_SD = experts.batched(x_ECD).reshape(spare, -1)
    # Dropped pairs read a zero row, not another token's output: a zero gate times that
    # output is NaN when it is non-finite, which would leak one token's inf into others.
    y_SD = jnp.concatenate([y_SD, jnp.zeros((1, y_SD.shape[1]), y_SD.dtype)])
    y_TKD = y_SD[slot_TK]
    kept_gates_TK = jnp.where(keep_TK, gates_TK.astype(jnp.float32), 0.0)
    out_TD = jnp.einsum("tkd,tk->td", y_TKD.astype(jnp.float32), kept_gates_TK)
    dropped = jnp.mean(jnp.logical_not(keep_TK).astype(jnp.float32))  # exact 0 when none drop
    return out_TD.astype(x_TD.dtype), dropped


# Dropless dispatch backend -> kernels_pallas.gmm backend for the grouped matmul.
# 'auto' (dropless) sorts and leaves the kernel to gmm's own 'auto': the Pallas
# kernel where the code is lowered for TPU/GPU, the XLA tile loop for CPU.
GMM_BACKENDS = {"auto": "auto", "ragged": "xla", "gmm": "pallas"}


def resolve_backend(dispatch: str, capacity_factor: float | None) -> str:
    """'auto' -> 'capacity' when a capacity factor is set, else 'auto' (dropless sorted
    dispatch, grouped-matmul kernel chosen per lowering platform); others unchanged."""
    if dispatch == "auto" and capacity_factor is not None:
        return "capacity"
    if dispatch == "gmm" and jax.default_backend() not in ("tpu", "gpu"):
        sharding.notice_once(f"dispatch='gmm' on {jax.default_backend()}: the Pallas kernel runs "
                             "in interpret mode (slow); dispatch='auto' uses the XLA grouped "
                             "matmul here and the kernel where lowered for TPU/GPU")
    return dispatch


def describe_backend(backend: str, platform: str | None = None) -> str:
    """Words for the log: what a resolved dispatch backend runs on ``platform``."""
    platform = platform or jax.default_backend()
    if backend not in GMM_BACKENDS:
        return backend
    kernel = GMM_BACKENDS[backend]
    if kernel == "auto":
        kernel = "pallas" if platform in ("tpu", "gpu") else "xla"
        return f"sorted dropless, gmm kernel {kernel} (auto on {platform})"
    interpret = " (interpret mode: no TPU/GPU here)" if kernel == "pallas" and platform not in (
        "tpu", "gpu") else ""
    return f"sorted dropless, gmm kernel {kernel}{interpret}"


def dispatch_experts(backend: str, x_TD, gates_TK, experts_TK, experts, *,
                     capacity_factor: float | None = None):
    """Run the routed experts with the named backend -> (out_TD, dropped_fraction).

    ``experts`` is an experts weights view (``moejax.experts``): anything with
    ``num_experts``, ``experts(x_MD, group_sizes_E, backend=)``, ``.dense(x_TD)``
    and ``.batched(x_ECD)``."""
    if backend == "dense":
        return dense_dispatch(x_TD, gates_TK, experts_TK, experts)
    if backend == "capacity":
        return capacity_dispatch(x_TD, gates_TK, experts_TK, experts,
                                 capacity_factor=capacity_factor)
    if backend in GMM_BACKENDS:
        return sorted_dispatch(x_TD, gates_TK, experts_TK, experts,
                               gmm_backend=GMM_BACKENDS[backend])
    raise ValueError(f"unknown dispatch backend {backend!r}")
