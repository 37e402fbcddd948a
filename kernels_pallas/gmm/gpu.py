"""Pallas GPU kernels (Triton lowering): grouped matmul (optionally int8 weights) and tgmm.

gmm grid = (work items, n-tiles); one program per (group, m-tile, n-tile):
  1. Work items come from the same metadata as the TPU kernel (metadata.py).
  2. The program loops over k-tiles, loading only its group's rows of lhs
     (masked loads; the mask also covers the M, K and N edges) and the
     matching rhs[group] tile, accumulating in float32.
  3. It stores with a row mask, so programs of groups sharing an m-tile write
     disjoint rows and can run concurrently. The tail pseudo-group (rows past
     sum(group_sizes)) runs zero k-steps and stores zeros.

tgmm grid = (groups, k-tiles, n-tiles): each program walks its group's rows
in steps of tm and accumulates lhs_tile^T @ grad_tile; empty groups store zeros.

Triton needs power-of-two tiles (see tiling.check_gpu_tiling).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels_pallas.gmm.metadata import make_group_metadata
from kernels_pallas.shard_map_types import out_struct

_COMPILER_PARAMS = pltriton.CompilerParams(num_warps=4, num_stages=3)


def _dot(a, b, **kw):
    # float32 inputs: full precision (no TF32), the numerics the tests check.
    allow_tf32 = False if a.dtype == jnp.float32 else None
    return pltriton.dot(a, b, allow_tf32=allow_tf32, **kw)


def _gmm_kernel(offsets_ref, group_ids_ref, m_tile_ids_ref, num_items_ref,
                lhs_ref, rhs_ref, *rest, num_groups, k_size, n_size, tm, tk, tn,
                transpose_rhs, has_scale, compute_dtype):
    if has_scale:
        scale_ref, out_ref = rest
    else:
        (out_ref,), scale_ref = rest, None
    item, n_i = pl.program_id(0), pl.program_id(1)

    @pl.when(item < num_items_ref[0])
    def _run():
        group = group_ids_ref[item]
        row0, col0 = m_tile_ids_ref[item] * tm, n_i * tn
        rows = row0 + jnp.arange(tm)
        cols = col0 + jnp.arange(tn)
        in_group = (rows >= offsets_ref[group]) & (rows < offsets_ref[group + 1])
        col_ok = cols < n_size
        weights = jnp.minimum(group, num_groups - 1)

        def k_step(kk, acc):
            k0 = kk * tk
            k_ok = (k0 + jnp.arange(tk)) < k_size
            lhs = pltriton.load(lhs_ref.at[pl.ds(row0, tm), pl.ds(k0, tk)],
                                mask=in_group[:, None] & k_ok[None, :], other=0)
            if transpose_rhs:
                rhs = pltriton.load(rhs_ref.at[weights, pl.ds(col0, tn), pl.ds(k0, tk)],
                                    mask=col_ok[:, None] & k_ok[None, :], other=0)
            else:
                rhs = pltriton.load(rhs_ref.at[weights, pl.ds(k0, tk), pl.ds(col0, tn)],
                                    mask=k_ok[:, None] & col_ok[None, :], other=0)
            return acc + _dot(lhs, rhs.astype(compute_dtype), trans_b=transpose_rhs)

        # The tail pseudo-group (group == num_groups) multiplies nothing: it stores zeros.
        num_k = jnp.where(group < num_groups, pl.cdiv(k_size, tk), 0)
        acc = jax.lax.fori_loop(0, num_k, k_step, jnp.zeros((tm, tn), jnp.float32))
        if has_scale:  # the tail loads none (scale 1): 0 * a non-finite scale would be NaN
            scale = pltriton.load(scale_ref.at[weights, pl.ds(col0, tn)],
                                  mask=col_ok & (group < num_groups), other=1)
            acc = acc * scale.astype(jnp.float32)[None, :]
        pltriton.store(out_ref.at[pl.ds(row0, tm), pl.ds(col0, tn)], acc.astype(out_ref.dtype),
                       mask=in_group[:, None] & col_ok[None, :])


def gmm_gpu(lhs_MK, rhs_GKN, group_sizes_G, *, tiling, out_dtype, interpret=False,
            transpose_rhs=False, rhs_scale_GN=None):
    """[M,K] x [G,K,N] (or [G,N,K] with transpose_rhs) -> [M,N] with Pallas-Triton."""
    m, k = lhs_MK.shape
    num_groups = rhs_GKN.shape[0]
    n = rhs_GKN.shape[1] if transpose_rhs else rhs_GKN.shape[2]
    tm, tk, tn = tiling.tm, tiling.tk, tiling.tn
    meta = make_group_metadata(group_sizes_G, m, tm, with_tail=True, visit_empty=False)
    operands = [meta.offsets, meta.group_ids, meta.m_tile_ids, meta.num_items, lhs_MK, rhs_GKN]
    if rhs_scale_GN is not None:
        operands.append(rhs_scale_GN)
    kernel = functools.partial(
        _gmm_kernel, num_groups=num_groups, k_size=k, n_size=n, tm=tm, tk=tk, tn=tn,
        transpose_rhs=transpose_rhs, has_scale=rhs_scale_GN is not None,
        compute_dtype=lhs_MK.dtype)
    return pl.pallas_call(
        kernel,
        out_shape=out_struct((m, n), out_dtype, lhs_MK),
        grid=(meta.group_ids.shape[0], pl.cdiv(n, tn)),
        compiler_params=_COMPILER_PARAMS,
        interpret=interpret,
        name="gmm_gpu",
    )(*operands)


def _tgmm_kernel(offsets_ref, lhs_ref, grad_ref, out_ref, *, k_size, n_size, tm, tk, tn):
    group, k_i, n_i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start, end = offsets_ref[group], offsets_ref[group + 1]
    k0, col0 = k_i * tk, n_i * tn
    k_ok = (k0 + jnp.arange(tk)) < k_size
    col_ok = (col0 + jnp.arange(tn)) < n_size

    def m_step(i, acc):
        row0 = start + i * tm
        row_ok = (row0 + jnp.arange(tm)) < end
        lhs = pltriton.load(lhs_ref.at[pl.ds(row0, tm), pl.ds(k0, tk)],
                            mask=row_ok[:, None] & k_ok[None, :], other=0)
        grad = pltriton.load(grad_ref.at[pl.ds(row0, tm), pl.ds(col0, tn)],
                             mask=row_ok[:, None] & col_ok[None, :], other=0)
        return acc + _dot(lhs, grad, trans_a=True)

    # tm as int32: a Python int is int64 under jax_enable_x64, and lax.div will not mix them
    acc = jax.lax.fori_loop(0, pl.cdiv(end - start, jnp.int32(tm)), m_step,
                            jnp.zeros((tk, tn), jnp.float32))
    pltriton.store(out_ref.at[group, pl.ds(k0, tk), pl.ds(col0, tn)], acc.astype(out_ref.dtype),
                   mask=k_ok[:, None] & col_ok[None, :])


def tgmm_gpu(lhs_MK, grad_MN, group_sizes_G, *, tiling, out_dtype, interpret=False):
    """Per-group lhs^T @ grad -> [G, K, N] with Pallas-Triton."""
    m, k = lhs_MK.shape
    n = grad_MN.shape[1]
    num_groups = group_sizes_G.shape[0]
    tm, tk, tn = tiling.tm, tiling.tk, tiling.tn
    ends = jnp.minimum(jnp.cumsum(group_sizes_G.astype(jnp.int32)), m)
    offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends])
    kernel = functools.partial(_tgmm_kernel, k_size=k, n_size=n, tm=tm, tk=tk, tn=tn)
    return pl.pallas_call(
        kernel,
        out_shape=out_struct((num_groups, k, n), out_dtype, lhs_MK),
        grid=(num_groups, pl.cdiv(k, tk), pl.cdiv(n, tn)),
        compiler_params=_COMPILER_PARAMS,
        interpret=interpret,
        name="tgmm_gpu",
    )(offsets, lhs_MK, grad_MN)
