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
3. gathers its expert weights over ``fsdp`` (FSDP), runs the L experts (the
   experts object's own grouped compute, float or int8) on its F/tensor slice
   (tensor parallelism);
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
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int

from moejax import sharding
from moejax.layers import LayerAux
from moejax.dispatch import (GMM_BACKENDS, dispatch_experts, permute, plan_sort,
                             take_rows, unpermute)

EXCHANGES = ("auto", "all_to_all", "ragged")


class EPLayout(NamedTuple):
    """Static facts about how one MoE call is laid out on the mesh."""

    mesh: object                   # the (abstract) mesh set with jax.set_mesh
    token_axes: tuple[str, ...]    # mesh axes that split the tokens ('batch')
    ep_axis: str | tuple[str, ...] | None  # mesh axes that split the experts (None: P = 1)
    num_devices_ep: int            # P
    experts_per_device: int        # L
    weight_specs: tuple[P, ...]    # one per leaf of the experts weights view
    partial_axes: tuple[str, ...]  # mesh axes splitting 'mlp' (not tokens): the output is a partial sum


def _mesh_axes(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def layout_for(mesh, experts, num_tokens: int, rules: sharding.ShardingRules | None = None
               ) -> EPLayout | None:
    """The layout of the sharded dispatch of ``experts`` (a weights view from
    ``moejax.experts``) under ``rules`` (default: the current rules), or None (no
    mesh, or sizes the axes do not divide; a FallbackWarning names which when the
    mesh asked for expert parallelism). Tokens split over the mesh axes of 'batch',
    experts over those of 'expert'. With no expert split nothing is exchanged, but
    the dispatch still runs per device on local tokens (data parallelism) instead of
    as one global sort that the compiler would have to partition."""
    if mesh is None or mesh.size == 1:
        return None
    rules = sharding.current_rules() if rules is None else rules
    token_axes, ep_axes = rules.mesh_axes("batch", mesh), rules.mesh_axes("expert", mesh)
    ep = math.prod(mesh.shape[a] for a in ep_axes)
    shards = math.prod(mesh.shape[a] for a in token_axes)
    problem = (f"{experts.num_experts} experts do not divide over the expert axes {ep_axes} "
               f"(size {ep})" if experts.num_experts % ep else
               f"{num_tokens} tokens do not split evenly over the batch axes {token_axes} "
               f"(size {shards})" if num_tokens % shards else
               f"the expert axes {ep_axes} do not split the tokens (batch axes {token_axes})"
               if not set(ep_axes) <= set(token_axes) else None)
    if problem:
        if ep > 1:
            warnings.warn(f"expert parallelism cannot apply: {problem}; the MoE layer runs "
                          "without it (every device computes all experts, as the compiler "
                          "partitions it)", sharding.FallbackWarning, stacklevel=3)
        return None
    leaf_axes = experts.leaf_axes()
    shapes = [leaf.shape for leaf in jax.tree.leaves(experts)]
    specs = tuple(sharding.logical_to_spec(axes, shape, mesh, rules)
                  for axes, shape in zip(leaf_axes, shapes))
    partial = {_mesh_axes(spec[axes.index("mlp")]) for axes, spec in zip(leaf_axes, specs)
               if "mlp" in axes}
    if len(partial) > 1:  # leaves split their hidden dim differently: no consistent partial sums
        raise ValueError(f"the rules split the experts' 'mlp' dims differently: {specs}")
    mlp_axes = partial.pop() if partial else ()
    if set(mlp_axes) & set(token_axes):
        # devices along these axes hold different tokens, so their hidden slices cannot be
        # summed (psum would add other tokens' outputs): gather the weights instead, as FSDP
        mlp_axes = ()
    ep_axis = None if not ep_axes else ep_axes[0] if len(ep_axes) == 1 else ep_axes
    return EPLayout(mesh, token_axes, ep_axis, ep, experts.num_experts // ep, specs, mlp_axes)


def resolve_exchange(exchange: str, capacity_factor: float | None) -> str:
    """'auto' -> ragged_all_to_all where the backend has it (TPU, GPU), else
    fixed-buffer all_to_all (XLA:CPU has no ragged_all_to_all)."""
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")
    del capacity_factor  # both exchanges honour it (drops counted in aux)
    if exchange == "ragged" and jax.default_backend() not in ("tpu", "gpu"):
        sharding.notice_once(f"ep_exchange='ragged': {jax.default_backend()} has no "
                             "ragged_all_to_all; it runs as an all_gather emulation here "
                             "(an export for TPU/GPU carries the real collective)")
    if exchange != "auto":
        return exchange
    if jax.default_backend() in ("tpu", "gpu"):
        return "ragged"
    return "all_to_all"


def describe(mesh, num_experts: int, exchange: str, capacity_factor: float | None,
             rules: sharding.ShardingRules | None = None) -> str:
    """Words for the log: whether and how a MoE layer runs expert-parallel on ``mesh``."""
    rules = sharding.current_rules() if rules is None else rules
    ep_axes = () if mesh is None else rules.mesh_axes("expert", mesh)
    if not ep_axes:
        return "expert parallelism: none (no mesh axis splits 'expert')"
    ep = math.prod(mesh.shape[a] for a in ep_axes)
    if num_experts % ep:
        return (f"expert parallelism: cannot apply ({num_experts} experts do not divide over "
                f"{ep_axes} of size {ep})")
    chosen = resolve_exchange(exchange, capacity_factor)
    how = f" ({exchange} on {jax.default_backend()})" if exchange == "auto" else ""
    return (f"expert parallelism: {num_experts // ep} experts per device over {ep_axes}, "
            f"exchange {chosen}{how}")


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
                             experts_TK: Int[Array, "T K"], experts, layout: EPLayout, *,
                             capacity_factor: float | None, exchange: str, backend: str):
    """Run the routed experts expert-parallel -> (out_TD, stats: LayerAux).

    ``backend`` is the MoE dispatch backend ('capacity' | 'auto' | 'ragged' | 'gmm'):
    on a mesh without an expert axis it runs as is on each device's tokens; with one,
    'gmm' picks the Pallas grouped matmul for the local experts. ``capacity_factor``
    sizes the buffers (None: dropless); an MoE passes one only with 'capacity'
    (MoEConfig refuses a factor with the dropless backends).

    stats: 'dropped_fraction', 'ep_overflow' (dropped pairs), 'dispatch_bytes'
    (bytes that crossed devices, dispatch + return, forward), 'dispatch_min_bytes'
    (off-device pairs x D x itemsize x 2: the least any exchange must move).
    Both byte counts count each token shard once (tensor-parallel replicas send
    identical copies).
    """
    exchange = resolve_exchange(exchange, capacity_factor)
    # jit so that the same call also works eagerly (the shardings need a trace)
    return _dispatch(x_TD, gates_TK, experts_TK, experts, layout=layout,
                     capacity_factor=capacity_factor, exchange=exchange, backend=backend)


@functools.partial(jax.jit, static_argnames=("layout", "capacity_factor", "exchange", "backend"))
def _dispatch(x_TD, gates_TK, experts_TK, experts, *, layout: EPLayout,
              capacity_factor: float | None, exchange: str, backend: str):
    tokens_local = x_TD.shape[0] // math.prod(layout.mesh.shape[a] for a in layout.token_axes)
    sizer = buffer_rows if exchange == "all_to_all" else receive_rows
    rows = sizer(tokens_local, gates_TK.shape[1], layout, capacity_factor)
    tok = P(layout.token_axes, None)
    gmm_backend = GMM_BACKENDS.get(backend, "auto")  # capacity backend: local experts dropless
    leaves, treedef = jax.tree.flatten(experts)
    leaf_axes = experts.leaf_axes()

    def local(x_tD, gates_tK, experts_tK, *w_leaves):
        w = treedef.unflatten(_gather_unsplit(w_leaves, leaf_axes, layout.weight_specs,
                                              keep_mlp=bool(layout.partial_axes)))
        if layout.num_devices_ep == 1:
            out_tD, stats = _local_body(x_tD, gates_tK, experts_tK, w, backend, capacity_factor)
        else:
            body = _fixed_body if exchange == "all_to_all" else _ragged_body
            out_tD, stats = body(x_tD, gates_tK, experts_tK, w, layout, rows, gmm_backend)
        if layout.partial_axes:
            out_tD = jax.lax.psum(out_tD, layout.partial_axes)
        stats = {k: jax.lax.psum(v, layout.token_axes) for k, v in stats.items()}
        return out_tD.astype(x_tD.dtype), stats

    specs = (tok, tok, tok, *layout.weight_specs)
    # shard_map does not reshard its inputs itself; put them where the specs say
    args = [jax.lax.with_sharding_constraint(a, s)
            for a, s in zip((x_TD, gates_TK, experts_TK, *leaves), specs)]
    out_TD, stats = jax.shard_map(local, mesh=layout.mesh, in_specs=specs,
                                  out_specs=(tok, P()))(*args)
    dropped_fraction = stats.pop("dropped_pairs") / experts_TK.size
    return out_TD, LayerAux(dropped_fraction=dropped_fraction, **stats)


def _gather_unsplit(leaves, leaf_axes, specs, *, keep_mlp: bool):
    """Each device runs whole experts on its 'mlp' slice (``keep_mlp``: tensor parallelism,
    outputs summed later) or on all of it: gather every other split dim of the weights but
    the expert dim (FSDP shards of 'embed'; 'mlp' split over axes that also split tokens)."""
    keep = ("expert", "mlp") if keep_mlp else ("expert",)
    out = []
    for leaf, axes, spec in zip(leaves, leaf_axes, specs):
        for dim, (name, entry) in enumerate(zip(axes, spec)):
            if name not in keep and entry is not None:
                leaf = jax.lax.all_gather(leaf, entry, axis=dim, tiled=True)
        out.append(leaf)
    return out


def _local_body(x_tD, gates_tK, experts_tK, experts, backend: str,
                capacity_factor: float | None):
    """No expert axis: every device holds all experts; dispatch its own tokens."""
    out_tD, dropped = dispatch_experts(backend, x_tD, gates_tK, experts_tK, experts,
                                       capacity_factor=capacity_factor)
    zero = jnp.zeros((), jnp.float32)
    return out_tD, {"dropped_pairs": dropped * experts_tK.size, "ep_overflow": zero,
                    "dispatch_bytes": zero, "dispatch_min_bytes": zero}


def _min_bytes(experts_tK, layout: EPLayout, row_bytes: int):
    """Off-device (token, slot) pairs x row bytes x 2 (there and back)."""
    me = jax.lax.axis_index(layout.ep_axis)
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


def _fixed_body(x_tD, gates_tK, experts_tK, experts, layout: EPLayout, capacity: int,
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
        return jax.lax.all_to_all(a, layout.ep_axis, 0, 0, tiled=True)

    recv_RD, recv_expert_R = exchange(send_RD), exchange(send_expert_R)
    order_R = jnp.argsort(recv_expert_R, stable=True).astype(jnp.int32)
    inverse_R = jnp.argsort(order_R).astype(jnp.int32)
    group_sizes_L = jnp.bincount(recv_expert_R, length=per_dev + 1)[:per_dev].astype(jnp.int32)
    y_sorted = experts(take_rows(recv_RD, order_R, inverse_R), group_sizes_L, backend=gmm_backend)
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

def _ragged_body(x_tD, gates_tK, experts_tK, experts, layout: EPLayout, recv_rows: int,
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
    me = jax.lax.axis_index(layout.ep_axis)
    plan = plan_sort(experts_tK, num_experts)
    x_mD = permute(x_tD, plan, top_k)
    counts_PE = jax.lax.all_gather(plan.group_sizes_E, layout.ep_axis)          # [source, expert]
    before_PE = jnp.cumsum(counts_PE, axis=0) - counts_PE                   # from lower sources
    totals_PL = counts_PE.sum(axis=0).reshape(ep, per_dev)
    base_PL = jnp.cumsum(totals_PL, axis=1) - totals_PL                     # expert-major start
    offsets_PE = base_PL.reshape(1, -1) + before_PE                         # slice start, receiver
    kept_PE = jnp.clip(recv_rows - offsets_PE, 0, counts_PE)                # what fits
    starts_PE = jnp.cumsum(counts_PE, axis=1) - counts_PE                   # in each sender's sort

    def mine(a_PE):  # [P, E] -> [P, L] columns of my experts, flattened source-major
        return jax.lax.dynamic_slice_in_dim(a_PE, me * per_dev, per_dev, axis=1).reshape(-1)

    recv_RD = ragged_exchange(x_mD, jnp.zeros((recv_rows, x_tD.shape[1]), x_mD.dtype),
                              starts_PE[me], kept_PE[me], offsets_PE[me], mine(kept_PE),
                              axis=layout.ep_axis)
    group_sizes_L = mine(kept_PE).reshape(ep, per_dev).sum(axis=0)
    y_RD = experts(recv_RD, group_sizes_L.astype(jnp.int32), backend=gmm_backend)
    y_mD = ragged_exchange(y_RD, jnp.zeros_like(x_mD), mine(offsets_PE), mine(kept_PE),
                           mine(starts_PE), kept_PE[me], axis=layout.ep_axis)
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


def ragged_exchange(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                    axis):
    """``ragged_all_to_all`` over the mesh axis ``axis``; XLA:CPU lacks it, so there an
    all_gather-based stand-in with the same semantics is lowered instead (chosen
    at lowering time, so an export for TPU/GPU carries the real collective)."""
    # the collective's result varies like its operand; say so for the output buffer
    missing = tuple(_varying(operand) - _varying(output))
    output = jax.lax.pcast(output, missing, to="varying") if missing else output
    args = (operand, output, input_offsets, send_sizes, output_offsets, recv_sizes)
    return jax.lax.platform_dependent(
        *args, cpu=functools.partial(_ragged_all_to_all_emulated, axis=axis),
        default=functools.partial(_ragged_all_to_all_native, axis=axis))


def _varying(x) -> frozenset:
    return jax.typeof(x).manual_axis_type.varying


def _ragged_all_to_all_native(operand, output, input_offsets, send_sizes, output_offsets,
                              recv_sizes, *, axis):
    return jax.lax.ragged_all_to_all(operand, output, input_offsets, send_sizes,
                                     output_offsets, recv_sizes, axis_name=axis)


def _ragged_all_to_all_emulated(operand, output, input_offsets, send_sizes, output_offsets,
                                recv_sizes, *, axis):
    """Same result as ``ragged_all_to_all`` from all_gathers: output row r takes the
    row of the (source, slice) whose destination range covers it."""
    del recv_sizes  # implied by the senders' send_sizes
    ep = jax.lax.axis_size(axis)
    me = jax.lax.axis_index(axis)
    per_dev = input_offsets.shape[0] // ep
    all_ops = jax.lax.all_gather(operand, axis)                       # [P, N, D]

    def to_me(a):  # [N] per sender -> [P, per_dev]: the slices each source sends me
        gathered = jax.lax.all_gather(a, axis).reshape(ep, ep, per_dev)
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
