"""Mosaic TPU kernels: grouped matmul (gmm, optionally int8 weights) and its weight gradient (tgmm).

gmm grid = (n-tiles, work items, k-tiles), k innermost:
  1. Scalar-prefetched metadata (see metadata.py) maps each work item to a
     (group, m-tile); index maps use it to fetch lhs[m-tile, k], rhs[group, k, n].
  2. Each step adds lhs_tile @ rhs_tile into a float32 VMEM accumulator,
     masking the K remainder (out-of-bounds block contents are undefined and
     would mix into valid outputs). M and N remainders need no mask: garbage
     there only reaches output rows/columns past the array, which the
     pipeline does not write back.
  3. At the last k-step the accumulator (times the int8 scale, if any) is
     stored with a row mask: only rows of this group are written, so groups
     that share an m-tile fill the resident output block in turn.
  4. A pseudo-group owns rows past sum(group_sizes); its items skip the
     matmul and store zeros. Padding items (past num_items) do nothing and
     keep the previous block indices, so they cost no DMA.

tgmm grid = (k-tiles, n-tiles, work items), items innermost: each group's
items accumulate lhs_tile^T @ grad_tile with rows outside the group masked to
zero; the group's last item stores out[group]. Empty groups get one item that
stores zeros.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.gmm.metadata import make_group_metadata
from kernels_pallas.shard_map_types import interpret_mode, out_struct

_DOT_NN = (((1,), (0,)), ((), ()))   # [tm,tk] x [tk,tn]
_DOT_NT = (((1,), (1,)), ((), ()))   # [tm,tk] x [tn,tk]
_DOT_TN = (((0,), (0,)), ((), ()))   # [tm,tk]^T x [tm,tn]


def _zero_outside(x, valid):
    return jnp.where(valid, x, jnp.zeros_like(x))


def _gmm_kernel(offsets_ref, group_ids_ref, m_tile_ids_ref, num_items_ref,
                lhs_ref, rhs_ref, *rest, num_groups, k_size, tm, tk, transpose_rhs,
                has_scale, compute_dtype):
    if has_scale:
        scale_ref, out_ref, acc_ref = rest
    else:
        (out_ref, acc_ref), scale_ref = rest, None
    item, k_step = pl.program_id(1), pl.program_id(2)
    group = group_ids_ref[item]
    is_real = item < num_items_ref[0]

    @pl.when(k_step == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(is_real & (group < num_groups))
    def _accumulate():
        lhs = lhs_ref[...]
        rhs = rhs_ref[...].astype(compute_dtype)
        if k_size % tk:  # the last k-tile reads past K: zero both operands there
            k_lhs = k_step * tk + jax.lax.broadcasted_iota(jnp.int32, lhs.shape, 1)
            k_rhs = k_step * tk + jax.lax.broadcasted_iota(
                jnp.int32, rhs.shape, 1 if transpose_rhs else 0)
            lhs = _zero_outside(lhs, k_lhs < k_size)
            rhs = _zero_outside(rhs, k_rhs < k_size)
        dims = _DOT_NT if transpose_rhs else _DOT_NN
        acc_ref[...] += jax.lax.dot_general(lhs, rhs, dims,
                                            preferred_element_type=jnp.float32)

    def store(result):
        rows = m_tile_ids_ref[item] * tm + jax.lax.broadcasted_iota(
            jnp.int32, (tm, 1), 0)
        in_group = (rows >= offsets_ref[group]) & (rows < offsets_ref[group + 1])
        out_ref[...] = jnp.where(in_group, result.astype(out_ref.dtype), out_ref[...])

    is_last_k = is_real & (k_step == pl.num_programs(2) - 1)

    @pl.when(is_last_k & (group < num_groups))
    def _store_group():
        result = acc_ref[...]
        if has_scale:
            result = result * scale_ref[...].astype(jnp.float32)
        store(result)

    @pl.when(is_last_k & (group == num_groups))
    def _store_tail():  # zeros, not acc * the last group's scale (0 * inf or NaN is NaN)
        store(jnp.zeros_like(acc_ref[...]))


def gmm_tpu(lhs_MK, rhs_GKN, group_sizes_G, *, tiling, out_dtype, interpret=False,
            transpose_rhs=False, rhs_scale_GN=None):
    """[M,K] x [G,K,N] (or [G,N,K] with transpose_rhs) -> [M,N] on the TPU (or interpreted)."""
    m, k = lhs_MK.shape
    num_groups = rhs_GKN.shape[0]
    n = rhs_GKN.shape[1] if transpose_rhs else rhs_GKN.shape[2]
    tm, tk, tn = tiling.tm, tiling.tk, tiling.tn
    meta = make_group_metadata(group_sizes_G, m, tm, with_tail=True, visit_empty=False)
    tiles_k, tiles_n = pl.cdiv(k, tk), pl.cdiv(n, tn)
    grid = (tiles_n, meta.group_ids.shape[0], tiles_k)

    def needs_matmul(item, gids, nitems):
        return (item < nitems[0]) & (gids[item] < num_groups)

    def k_block(item, k_step, gids, nitems):
        # Items without a matmul park on the last k block: no new DMA for them.
        return jnp.where(needs_matmul(item, gids, nitems), k_step, tiles_k - 1)

    def lhs_map(n_i, item, k_step, offsets, gids, mtiles, nitems):
        return mtiles[item], k_block(item, k_step, gids, nitems)

    def rhs_map(n_i, item, k_step, offsets, gids, mtiles, nitems):
        group = jnp.minimum(gids[item], num_groups - 1)
        kb = k_block(item, k_step, gids, nitems)
        return (group, n_i, kb) if transpose_rhs else (group, kb, n_i)

    def scale_map(n_i, item, k_step, offsets, gids, mtiles, nitems):
        return jnp.minimum(gids[item], num_groups - 1), 0, n_i

    def out_map(n_i, item, k_step, offsets, gids, mtiles, nitems):
        return mtiles[item], n_i

    rhs_block = (None, tn, tk) if transpose_rhs else (None, tk, tn)
    in_specs = [pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec(rhs_block, rhs_map)]
    operands = [lhs_MK, rhs_GKN]
    if rhs_scale_GN is not None:
        in_specs.append(pl.BlockSpec((None, 1, tn), scale_map))
        operands.append(rhs_scale_GN.reshape(num_groups, 1, n))
    kernel = functools.partial(
        _gmm_kernel, num_groups=num_groups, k_size=k, tm=tm, tk=tk,
        transpose_rhs=transpose_rhs, has_scale=rhs_scale_GN is not None,
        compute_dtype=lhs_MK.dtype)
    call = pl.pallas_call(
        kernel,
        out_shape=out_struct((m, n), out_dtype, lhs_MK),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4, grid=grid, in_specs=in_specs,
            out_specs=pl.BlockSpec((tm, tn), out_map),
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)]),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        interpret=interpret_mode(interpret, group_sizes_G, *operands),
        name="gmm",
    )
    return call(meta.offsets, meta.group_ids, meta.m_tile_ids, meta.num_items, *operands)


def _tgmm_kernel(offsets_ref, group_ids_ref, m_tile_ids_ref, num_items_ref,
                 lhs_ref, grad_ref, out_ref, acc_ref, *, tm):
    item = pl.program_id(2)
    last_item = num_items_ref[0] - 1
    group = group_ids_ref[item]
    starts_group = (item == 0) | (group != group_ids_ref[jnp.maximum(item - 1, 0)])
    ends_group = (item == last_item) | (group != group_ids_ref[jnp.minimum(item + 1, last_item)])
    is_real = item <= last_item

    @pl.when(is_real & starts_group)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(is_real)
    def _accumulate():
        rows = m_tile_ids_ref[item] * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
        in_group = (rows >= offsets_ref[group]) & (rows < offsets_ref[group + 1])
        lhs = _zero_outside(lhs_ref[...], in_group)
        grad = _zero_outside(grad_ref[...], in_group)
        acc_ref[...] += jax.lax.dot_general(lhs, grad, _DOT_TN,
                                            preferred_element_type=jnp.float32)

    @pl.when(is_real & ends_group)
    def _store():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def tgmm_tpu(lhs_MK, grad_MN, group_sizes_G, *, tiling, out_dtype, interpret=False):
    """Per-group lhs^T @ grad -> [G, K, N] on the TPU (or interpreted)."""
    m, k = lhs_MK.shape
    n = grad_MN.shape[1]
    num_groups = group_sizes_G.shape[0]
    tm, tk, tn = tiling.tm, tiling.tk, tiling.tn
    meta = make_group_metadata(group_sizes_G, m, tm, with_tail=False, visit_empty=True)
    grid = (pl.cdiv(k, tk), pl.cdiv(n, tn), meta.group_ids.shape[0])

    def lhs_map(k_i, n_i, item, offsets, gids, mtiles, nitems):
        return mtiles[item], k_i

    def grad_map(k_i, n_i, item, offsets, gids, mtiles, nitems):
        return mtiles[item], n_i

    def out_map(k_i, n_i, item, offsets, gids, mtiles, nitems):
        return gids[item], k_i, n_i

    call = pl.pallas_call(
        functools.partial(_tgmm_kernel, tm=tm),
        out_shape=out_struct((num_groups, k, n), out_dtype, lhs_MK),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4, grid=grid,
            in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec((tm, tn), grad_map)],
            out_specs=pl.BlockSpec((None, tk, tn), out_map),
            scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)]),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret_mode(interpret, group_sizes_G, lhs_MK, grad_MN),
        name="tgmm",
    )
    return call(meta.offsets, meta.group_ids, meta.m_tile_ids, meta.num_items, lhs_MK, grad_MN)
