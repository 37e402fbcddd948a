"""Expert-parallel dispatch: experts spread over the mesh's ``expert`` axis.

Shapes (per device, inside ``shard_map``): t local tokens, K = top_k,
m = t*K local (token, slot) pairs, P = size of the ``expert`` axis, L = E/P
experts per device, C rows per (source, destination) buffer, R rows received,
D model width, F expert hidden width (F/tensor per device).

Tokens are split over the batch axes (data, fsdp, expert); routing happens
before, on the global arrays, so balance losses equal the single-device ones.
Inside ``shard_map`` each device:

1. groups its (token, slot) pairs by the device that owns their expert;
2. exchanges them over ``expert`` so that each device holds the tokens of its
   own L experts -- with fixed [P, C] buffers and ``all_to_all`` (every
   backend), or with ``ragged_all_to_all`` (TPU/GPU; no padding sent);
3. gathers its expert weights over ``fsdp`` (FSDP), runs the L experts with
   the grouped matmul on its F/tensor slice (tensor parallelism);
4. sends the results back the same way, combines the K outputs per token with
   the gates in float32, and sums the tensor-parallel partial results.

Fixed buffers hold ``C = t * min(K, L)`` rows when dropless (a token's K
experts are distinct, so at most min(K, L) of them live on one device) or
``ceil(capacity_factor * m / P)`` rows; the ragged exchange's receive buffer
holds ``R = P * t * min(K, L)`` rows when dropless (every source's worst case)
or ``ceil(capacity_factor * m)``. Pairs that do not fit are dropped, counted
and reported (``ep_overflow``, ``dropped_fraction``), never silently.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int

from moejax import sharding
from moejax.layers import LayerAux
from moejax.dispatch import (GMM_BACKENDS, dispatch_experts, grouped_ffn, permute, plan_sort,
                             take_rows, unpermute)

EXCHANGES = ("auto", "all_to_all", "ragged")
TOKEN_AXES = ("data", "fsdp", "expert")
EXPERT_AXIS = "expert"


class EPLayout(NamedTuple):
    """Static facts about how one MoE call is laid out on the mesh."""

    mesh: object                   # the (abstract) mesh set with jax.set_mesh
    token_axes: tuple[str, ...]    # mesh axes that split the tokens
    num_devices_ep: int            # P
    experts_per_device: int        # L
    w_in_spec: P                   # spec of w_gate / w_up [E, D, F]
    w_out_spec: P                  # spec of w_down [E, F, D]


def layout_for(mesh, num_experts: int, num_tokens: int, d_model: int, d_ff: int
               ) -> EPLayout | None:
    """The layout of the sharded dispatch, or None (no mesh, or sizes the axes do
    not divide). With an ``expert`` axis of size 1 nothing is exchanged, but the
    dispatch still runs per device on local tokens (data parallelism) instead of
    as one global sort that the compiler would have to partition."""
    if mesh is None or mesh.size == 1:
        return None
    ep = mesh.shape.get(EXPERT_AXIS, 1)
    token_axes = tuple(a for a in TOKEN_AXES if mesh.shape.get(a, 1) > 1)
    if num_experts % ep or num_tokens % math.prod(mesh.shape[a] for a in token_axes):
        return None
    w_in = sharding.logical_to_spec(("expert", "embed", "mlp"), (num_experts, d_model, d_ff), mesh)
    w_out = sharding.logical_to_spec(("expert", "mlp", "embed"), (num_experts, d_ff, d_model), mesh)
    return EPLayout(mesh, token_axes, ep, num_experts // ep, w_in, w_out)


def resolve_exchange(exchange: str, capacity_factor: float | None) -> str:
    """'auto' -> ragged_all_to_all where the backend has it (TPU, GPU), else
    fixed-buffer all_to_all (XLA:CPU has no ragged_all_to_all)."""
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")
    if exchange != "auto":
        return exchange
    del capacity_factor  # both exchanges honour it (drops counted in aux)
    if jax.default_backend() in ("tpu", "gpu"):
        return "ragged"
    return "all_to_all"


def buffer_rows(tokens_local: int, top_k: int, layout: EPLayout,
                capacity_factor: float | None) -> int:
    """C: rows per (source, destination) buffer."""
    dropless = tokens_local * min(top_k, layout.experts_per_device)
    if capacity_factor is None:
        return dropless
    sized = math.ceil(capacity_factor * tokens_local * top_k / layout.num_devices_ep)
    return max(1, min(dropless, sized))


def receive_rows(tokens_local: int, top_k: int, layout: EPLayout,
                 capacity_factor: float | None) -> int:
    """Rows of the ragged exchange's receive buffer: every source's worst case when
    dropless, else ``ceil(capacity_factor * t * K)`` (the balanced load times the factor)."""
    dropless = layout.num_devices_ep * tokens_local * min(top_k, layout.experts_per_device)
    if capacity_factor is None:
        return dropless
    return max(1, min(dropless, math.ceil(capacity_factor * tokens_local * top_k)))


def expert_parallel_dispatch(x_TD: Float[Array, "T D"], gates_TK: Float[Array, "T K"],
                             experts_TK: Int[Array, "T K"], weights, layout: EPLayout, *,
                             capacity_factor: float | None, exchange: str, backend: str):
    """Run the routed experts expert-parallel -> (out_TD, stats: LayerAux).

    ``backend`` is the MoE dispatch backend ('capacity' | 'ragged' | 'gmm'): on a
    mesh without an expert axis it runs as is on each device's tokens; with one,
    'gmm' picks the Pallas grouped matmul for the local experts.

    stats: 'dropped_fraction', 'ep_overflow' (dropped pairs), 'dispatch_bytes'
    (bytes that crossed devices, dispatch + return, forward), 'dispatch_min_bytes'
    (off-device pairs x D x itemsize x 2: the least any exchange must move).
    Both byte counts count each token shard once (tensor-parallel replicas send
    identical copies).
    """
    exchange = resolve_exchange(exchange, capacity_factor)
    # jit so that the same call also works eagerly (the shardings need a trace)
    return _dispatch(x_TD, gates_TK, experts_TK, tuple(weights), layout=layout,
                     capacity_factor=capacity_factor, exchange=exchange, backend=backend)


@functools.partial(jax.jit, static_argnames=("layout", "capacity_factor", "exchange", "backend"))
def _dispatch(x_TD, gates_TK, experts_TK, weights, *, layout: EPLayout,
              capacity_factor: float | None, exchange: str, backend: str):
    tokens_local = x_TD.shape[0] // math.prod(layout.mesh.shape[a] for a in layout.token_axes)
    sizer = buffer_rows if exchange == "all_to_all" else receive_rows
    rows = sizer(tokens_local, gates_TK.shape[1], layout, capacity_factor)
    tok = P(layout.token_axes, None)
    gmm_backend = GMM_BACKENDS.get(backend, "xla")  # capacity backend: local experts dropless

    def local(x_tD, gates_tK, experts_tK, w_gate, w_up, w_down):
        w = _gather_fsdp(w_gate, w_up, w_down, layout)
        if layout.num_devices_ep == 1:
            out_tD, stats = _local_body(x_tD, gates_tK, experts_tK, w, backend, capacity_factor)
        else:
            body = _fixed_body if exchange == "all_to_all" else _ragged_body
            out_tD, stats = body(x_tD, gates_tK, experts_tK, w, layout, rows, gmm_backend)
        if _sharded_over(layout.w_in_spec[2], "tensor"):
            out_tD = jax.lax.psum(out_tD, "tensor")
        stats = {k: jax.lax.psum(v, layout.token_axes) for k, v in stats.items()}
        return out_tD.astype(x_tD.dtype), stats

    specs = (tok, tok, tok, layout.w_in_spec, layout.w_in_spec, layout.w_out_spec)
    # shard_map does not reshard its inputs itself; put them where the specs say
    args = [jax.lax.with_sharding_constraint(a, s)
            for a, s in zip((x_TD, gates_TK, experts_TK, *weights), specs)]
    out_TD, stats = jax.shard_map(local, mesh=layout.mesh, in_specs=specs,
                                  out_specs=(tok, P()))(*args)
    dropped_fraction = stats.pop("dropped_pairs") / experts_TK.size
    return out_TD, LayerAux(dropped_fraction=dropped_fraction, **stats)


def _sharded_over(entry, axis: str) -> bool:
    return entry == axis or (isinstance(entry, tuple) and axis in entry)


def _gather_fsdp(w_gate_LDF, w_up_LDF, w_down_LFD, layout: EPLayout):
    """FSDP: the embed dim of the expert weights is split over ``fsdp``; gather it."""
    if _sharded_over(layout.w_in_spec[1], "fsdp"):
        w_gate_LDF = jax.lax.all_gather(w_gate_LDF, "fsdp", axis=1, tiled=True)
        w_up_LDF = jax.lax.all_gather(w_up_LDF, "fsdp", axis=1, tiled=True)
    if _sharded_over(layout.w_out_spec[2], "fsdp"):
        w_down_LFD = jax.lax.all_gather(w_down_LFD, "fsdp", axis=2, tiled=True)
    return w_gate_LDF, w_up_LDF, w_down_LFD


def _local_body(x_tD, gates_tK, experts_tK, weights, backend: str,
                capacity_factor: float | None):
    """No expert axis: every device holds all experts; dispatch its own tokens."""
    out_tD, dropped = dispatch_experts(backend, x_tD, gates_tK, experts_tK, weights,
                                       capacity_factor=capacity_factor)
    zero = jnp.zeros((), jnp.float32)
    return out_tD, {"dropped_pairs": dropped * experts_tK.size, "ep_overflow": zero,
                    "dispatch_bytes": zero, "dispatch_min_bytes": zero}


def _min_bytes(experts_tK, layout: EPLayout, row_bytes: int):
    """Off-device (token, slot) pairs x row bytes x 2 (there and back)."""
    me = jax.lax.axis_index(EXPERT_AXIS)
    off = jnp.sum((experts_tK // layout.experts_per_device) != me).astype(jnp.float32)
    return off * (2 * row_bytes)


# --- strategy 1: fixed per-destination buffers + all_to_all ---------------------------

def _buffer_slots(dest_m: Int[Array, "m"], ep: int, capacity: int):
    """Row of each pair in the flattened [P, C] send buffers (P*C = spare row when
    it does not fit) and whether it fits; earlier pairs win within a destination."""
    pairs = dest_m.shape[0]
    order_m = jnp.argsort(dest_m, stable=True)
    run_start_P = jnp.searchsorted(dest_m[order_m], jnp.arange(ep, dtype=jnp.int32))
    position_m = jnp.zeros((pairs,), jnp.int32).at[order_m].set(
        jnp.arange(pairs, dtype=jnp.int32) - run_start_P[dest_m[order_m]])
    keep_m = position_m < capacity
    return jnp.where(keep_m, dest_m * capacity + position_m, ep * capacity), keep_m


def _fixed_body(x_tD, gates_tK, experts_tK, weights, layout: EPLayout, capacity: int,
                gmm_backend: str):
    """1. pairs in slot-major order (first choices first), stable-sorted by destination;
    2. position within the destination = rank in its run; pairs at position >= C drop;
    3. scatter token ids and local expert ids into [P, C] buffers (empty rows: token t,
       a zero row, and expert id L, sorted last); all_to_all both over ``expert``;
    4. receiver sorts its P*C rows by local expert, grouped matmul, un-sorts;
    5. all_to_all back, gather each pair's row, combine with the kept gates."""
    (tokens, top_k), ep, per_dev = experts_tK.shape, layout.num_devices_ep, layout.experts_per_device
    experts_m = experts_tK.T.reshape(-1).astype(jnp.int32)          # slot-major: f = k*t + i
    token_m = jnp.tile(jnp.arange(tokens, dtype=jnp.int32), top_k)
    slot_m, keep_m = _buffer_slots(experts_m // per_dev, ep, capacity)
    spare = ep * capacity

    send_token_R = jnp.full((spare + 1,), tokens, jnp.int32).at[slot_m].set(token_m)[:spare]
    send_expert_R = jnp.full((spare + 1,), per_dev, jnp.int32).at[slot_m].set(
        experts_m % per_dev)[:spare]
    x_padded = jnp.concatenate([x_tD, jnp.zeros((1, x_tD.shape[1]), x_tD.dtype)])
    send_RD = x_padded[send_token_R]

    def exchange(a):
        return jax.lax.all_to_all(a, EXPERT_AXIS, 0, 0, tiled=True)

    recv_RD, recv_expert_R = exchange(send_RD), exchange(send_expert_R)
    order_R = jnp.argsort(recv_expert_R, stable=True).astype(jnp.int32)
    inverse_R = jnp.argsort(order_R).astype(jnp.int32)
    group_sizes_L = jnp.bincount(recv_expert_R, length=per_dev + 1)[:per_dev].astype(jnp.int32)
    y_sorted = grouped_ffn(take_rows(recv_RD, order_R, inverse_R), *weights, group_sizes_L,
                           backend=gmm_backend)
    back_RD = exchange(take_rows(y_sorted, inverse_R, order_R))

    back_padded = jnp.concatenate([back_RD, jnp.zeros((1, back_RD.shape[1]), back_RD.dtype)])
    y_KtD = back_padded[slot_m].reshape(top_k, tokens, -1)
    gates_Kt = jnp.where(keep_m.reshape(top_k, tokens), gates_tK.T.astype(jnp.float32), 0.0)
    out_tD = jnp.einsum("ktd,kt->td", y_KtD.astype(jnp.float32), gates_Kt)

    row_bytes = x_tD.shape[1] * x_tD.dtype.itemsize
    sent_rows = (ep - 1) * capacity                    # rows leaving this device, each way
    overflow = jnp.sum(~keep_m).astype(jnp.float32)
    stats = {
        "dropped_pairs": overflow,
        "ep_overflow": overflow,
        "dispatch_bytes": jnp.float32(sent_rows * (2 * row_bytes + 4)),
        "dispatch_min_bytes": _min_bytes(experts_tK, layout, row_bytes),
    }
    return out_tD, stats


# --- strategy 2: ragged_all_to_all (nothing padded on the wire) ------------------------

def _ragged_body(x_tD, gates_tK, experts_tK, weights, layout: EPLayout, recv_rows: int,
                 gmm_backend: str):
    """1. sort local pairs by global expert; per-expert counts, all-gathered -> [P, E];
    2. one ragged slice per (destination, local expert), written on the receiver in
       expert-major order, so the received rows are already grouped for the matmul;
       every device knows all counts, so all agree which slices' tails fall past the
       receive buffer (only with a capacity factor): those pairs drop and are counted;
    3. grouped matmul over the receive buffer (rows past the total are zero);
    4. the transposed ragged exchange brings the rows back into sorted-pair order
       (dropped pairs come back as zero rows)."""
    top_k, ep, per_dev = experts_tK.shape[1], layout.num_devices_ep, layout.experts_per_device
    num_experts = ep * per_dev
    me = jax.lax.axis_index(EXPERT_AXIS)
    plan = plan_sort(experts_tK, num_experts)
    x_mD = permute(x_tD, plan, top_k)
    counts_PE = jax.lax.all_gather(plan.group_sizes_E, EXPERT_AXIS)          # [source, expert]
    before_PE = jnp.cumsum(counts_PE, axis=0) - counts_PE                   # from lower sources
    totals_PL = counts_PE.sum(axis=0).reshape(ep, per_dev)
    base_PL = jnp.cumsum(totals_PL, axis=1) - totals_PL                     # expert-major start
    offsets_PE = base_PL.reshape(1, -1) + before_PE                         # slice start, receiver
    kept_PE = jnp.clip(recv_rows - offsets_PE, 0, counts_PE)                # what fits
    starts_PE = jnp.cumsum(counts_PE, axis=1) - counts_PE                   # in each sender's sort

    def mine(a_PE):  # [P, E] -> [P, L] columns of my experts, flattened source-major
        return jax.lax.dynamic_slice_in_dim(a_PE, me * per_dev, per_dev, axis=1).reshape(-1)

    recv_RD = ragged_exchange(x_mD, jnp.zeros((recv_rows, x_tD.shape[1]), x_mD.dtype),
                              starts_PE[me], kept_PE[me], offsets_PE[me], mine(kept_PE))
    group_sizes_L = mine(kept_PE).reshape(ep, per_dev).sum(axis=0)
    y_RD = grouped_ffn(recv_RD, *weights, group_sizes_L.astype(jnp.int32), backend=gmm_backend)
    y_mD = ragged_exchange(y_RD, jnp.zeros_like(x_mD), mine(offsets_PE), mine(kept_PE),
                           mine(starts_PE), kept_PE[me])
    out_tD = unpermute(y_mD, plan, gates_tK).astype(jnp.float32)

    row_bytes = x_tD.shape[1] * x_tD.dtype.itemsize
    on_device_E = (jnp.arange(num_experts) // per_dev) == me
    sent_off_device = jnp.sum(jnp.where(on_device_E, 0, kept_PE[me])).astype(jnp.float32)
    overflow = jnp.sum(counts_PE[me] - kept_PE[me]).astype(jnp.float32)
    stats = {
        "dropped_pairs": overflow,
        "ep_overflow": overflow,
        # payload rows (the off-device pairs that fit) + the all-gathered counts
        "dispatch_bytes": sent_off_device * (2 * row_bytes) + jnp.float32((ep - 1) * num_experts * 4),
        "dispatch_min_bytes": _min_bytes(experts_tK, layout, row_bytes),
    }
    return out_tD, stats


def ragged_exchange(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes):
    """``ragged_all_to_all`` over ``expert``; XLA:CPU lacks it, so there an
    all_gather-based stand-in with the same semantics is lowered instead (chosen
    at lowering time, so an export for TPU/GPU carries the real collective)."""
    # the collective's result varies like its operand; say so for the output buffer
    missing = tuple(_varying(operand) - _varying(output))
    output = jax.lax.pcast(output, missing, to="varying") if missing else output
    args = (operand, output, input_offsets, send_sizes, output_offsets, recv_sizes)
    return jax.lax.platform_dependent(*args, cpu=_ragged_all_to_all_emulated,
                                      default=_ragged_all_to_all_native)


def _varying(x) -> frozenset:
    return jax.typeof(x).manual_axis_type.varying


def _ragged_all_to_all_native(operand, output, input_offsets, send_sizes, output_offsets,
                              recv_sizes):
    return jax.lax.ragged_all_to_all(operand, output, input_offsets, send_sizes,
                                     output_offsets, recv_sizes, axis_name=EXPERT_AXIS)


def _ragged_all_to_all_emulated(operand, output, input_offsets, send_sizes, output_offsets,
                                recv_sizes):
    """Same result as ``ragged_all_to_all`` from all_gathers: output row r takes the
    row of the (source, slice) whose destination range covers it."""
    del recv_sizes  # implied by the senders' send_sizes
    ep = jax.lax.axis_size(EXPERT_AXIS)
    me = jax.lax.axis_index(EXPERT_AXIS)
    per_dev = input_offsets.shape[0] // ep
    all_ops = jax.lax.all_gather(operand, EXPERT_AXIS)                       # [P, N, D]

    def to_me(a):  # [N] per sender -> [P, per_dev]: the slices each source sends me
        gathered = jax.lax.all_gather(a, EXPERT_AXIS).reshape(ep, ep, per_dev)
        return gathered[:, me]

    in_off, sizes, out_off = to_me(input_offsets), to_me(send_sizes), to_me(output_offsets)
    r = jnp.arange(output.shape[0])[:, None, None]
    hit_RPS = (r >= out_off[None]) & (r < (out_off + sizes)[None])
    source_R = jnp.argmax(hit_RPS.any(axis=2), axis=1)
    row_RPS = in_off[None] + r - out_off[None]
    row_R = jnp.sum(jnp.where(hit_RPS, row_RPS, 0), axis=(1, 2))
    found_R = hit_RPS.any(axis=(1, 2))
    taken = all_ops[source_R, jnp.clip(row_R, 0, operand.shape[0] - 1)]
    return jnp.where(found_R[:, None], taken, output)
