"""Grouped matmul for XLA:CPU: a loop of dense row tiles, each tile inside one group.

On XLA:CPU ``jax.lax.ragged_dot`` costs many times a dense matmul of the same
FLOPs. This module reaches dense speed by cutting every group into tiles of
``T`` rows that start at the group's own first row, so that each tile is one
plain ``[T, K] @ [K, N]`` dot with a single weight matrix.

Algorithm (forward, ``gmm_xla``):

1. Plan (``tile_plan``): group g owns rows ``[start_g, end_g)`` and gets
   ``ceil(size_g / T)`` tiles whose first rows are ``start_g, start_g + T, ...``.
   A group's last tile runs past ``end_g`` into the next group (or past the
   end of ``lhs``; its first row is then pulled back to ``M - T``). The tile
   count is data dependent, but bounded by ``M // T + G``, so the plan lives in
   static arrays of that length and a dynamic trip count skips the unused tail.
2. Loop over tiles in order (``fori_loop``): slice ``lhs[row0 : row0 + T]``
   and ``rhs[g]`` with ``dynamic_slice`` (no gather of the weights into a big
   per-tile buffer), one dense dot with float32 accumulation.
3. Write the tile back into the ``[M, N]`` output carry with
   ``dynamic_update_slice`` (XLA updates loop carries in place), keeping the
   old values of rows that lie outside group g: those belong to the
   neighbouring group's tiles (or to no group and stay zero).

Padding waste is under ``T`` rows per group (about ``G * T / 2`` rows in all),
and no row is gathered, scattered or permuted.

Backward (``custom_vjp``):

4. ``dlhs = gmm(grad, rhs^T)``: the same loop, contracting the tile of
   ``grad [T, N]`` with ``rhs[g] [K, N]`` over N (no transposed copy of rhs).
5. ``drhs = tgmm(lhs, grad)``: the same tiles; rows outside group g are zeroed
   in the lhs tile, and ``lhs_tile^T @ grad_tile`` is added in place into
   ``drhs[g]`` of the ``[G, K, N]`` carry (no ``[tiles, K, N]`` buffer, no
   scatter-add). Steps 4 and 5 share one loop so each tile is sliced once.

Rows at or past ``sum(group_sizes)`` give zero output and zero gradient;
empty groups get zero weight gradient.
"""

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Integer

MIN_TILE_ROWS = 64
MAX_TILE_ROWS = 512


class TilePlan(NamedTuple):
    """Static-length description of the row tiles (step 1); entries past num_tiles unused."""
    group_P: jax.Array   # int32 [P]: group of each tile
    row0_P: jax.Array    # int32 [P]: first row of the slice, in [0, M - T]
    first_P: jax.Array   # int32 [P]: first row the tile owns (> row0 only if pulled back)
    num_tiles: jax.Array  # int32 []: tiles actually used
    ends_G: jax.Array    # int32 [G]: one past the last row of each group (clipped to M)


def default_tile_rows(num_rows: int, num_groups: int) -> int:
    """Rows per tile: ~1/8 of the mean group (waste ~6%), a power of two in [64, 512], <= M.

    Measured on XLA:CPU (benchmarks/gmm_cpu.py): below 64 rows the per-tile
    dots lose efficiency and loop overhead grows; above 512 nothing is gained.
    """
    target = max(num_rows // max(num_groups, 1) // 8, 1)
    tile = MIN_TILE_ROWS
    while tile * 2 <= min(target, MAX_TILE_ROWS):
        tile *= 2
    return max(1, min(tile, num_rows))


def tile_plan(group_sizes_G: jax.Array, num_rows: int, tile_rows: int) -> TilePlan:
    """Step 1: cut each group into tiles of ``tile_rows`` starting at the group's first row."""
    num_groups = group_sizes_G.shape[0]
    sizes_G = jnp.maximum(group_sizes_G.astype(jnp.int32), 0)
    ends_G = jnp.minimum(jnp.cumsum(sizes_G), num_rows)
    starts_G = jnp.minimum(ends_G - sizes_G, num_rows)
    sizes_G = ends_G - starts_G  # rows past M are dropped, as if the sizes were clipped
    tiles_G = (sizes_G + tile_rows - 1) // tile_rows
    tile_end_G = jnp.cumsum(tiles_G)
    tile_start_G = tile_end_G - tiles_G
    max_tiles = num_rows // tile_rows + num_groups  # sum(ceil(s/T)) <= floor(M/T) + G
    tile_P = jnp.arange(max_tiles, dtype=jnp.int32)
    group_P = jnp.searchsorted(tile_end_G, tile_P, side="right").astype(jnp.int32)
    group_P = jnp.minimum(group_P, num_groups - 1)  # unused slots: any valid group
    first_P = starts_G[group_P] + (tile_P - tile_start_G[group_P]) * tile_rows
    # A slice must lie inside lhs: a tile near the end is pulled back to M - T.
    # It then also covers rows of the group's previous tile; it does not own
    # them (first_P), so the weight gradient counts every row once.
    row0_P = jnp.clip(first_P, 0, num_rows - tile_rows)
    return TilePlan(group_P, row0_P, first_P, tile_end_G[-1], ends_G)


def _owned_rows(plan: TilePlan, i, tile_rows: int) -> jax.Array:
    """[T, 1] bool: which rows of tile i's slice belong to it (its group, not an earlier tile)."""
    rows_T = plan.row0_P[i] + jnp.arange(tile_rows, dtype=jnp.int32)
    owned_T = (rows_T >= plan.first_P[i]) & (rows_T < plan.ends_G[plan.group_P[i]])
    return owned_T[:, None]


def _accumulation_dtype(*dtypes) -> jnp.dtype:
    return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


def _grouped_matmul(lhs_MK, rhs_GKN, plan: TilePlan, tile_rows: int, out_dtype,
                    contract_rhs_dim: int = 1) -> jax.Array:
    """Steps 2-3: out[rows of g] = lhs[rows of g] @ rhs[g] (rhs[g] contracted on ``contract_rhs_dim``)."""
    num_rows = lhs_MK.shape[0]
    out_cols = rhs_GKN.shape[2 if contract_rhs_dim == 1 else 1]
    acc_dtype = _accumulation_dtype(lhs_MK.dtype, rhs_GKN.dtype)
    dims = (((1,), (contract_rhs_dim - 1,)), ((), ()))

    def body(i, out_MN):
        g, row0 = plan.group_P[i], plan.row0_P[i]
        lhs_TK = jax.lax.dynamic_slice_in_dim(lhs_MK, row0, tile_rows, 0)
        rhs_KN = jax.lax.dynamic_index_in_dim(rhs_GKN, g, 0, keepdims=False)
        new_TN = jax.lax.dot_general(lhs_TK, rhs_KN, dims, preferred_element_type=acc_dtype)
        old_TN = jax.lax.dynamic_slice_in_dim(out_MN, row0, tile_rows, 0)
        mine_T1 = _owned_rows(plan, i, tile_rows)
        tile_TN = jnp.where(mine_T1, new_TN.astype(out_dtype), old_TN)
        return jax.lax.dynamic_update_slice_in_dim(out_MN, tile_TN, row0, 0)

    out_MN = jnp.zeros((num_rows, out_cols), out_dtype)
    return jax.lax.fori_loop(0, plan.num_tiles, body, out_MN)


def _grouped_weight_grad(lhs_MK, grad_MN, plan: TilePlan, tile_rows: int, num_groups: int,
                         out_dtype) -> jax.Array:
    """Step 5: per-group ``lhs^T @ grad`` -> [G, K, N], accumulated in place."""
    acc_dtype = _accumulation_dtype(lhs_MK.dtype, grad_MN.dtype)
    k_dim, n_dim = lhs_MK.shape[1], grad_MN.shape[1]

    def body(i, acc_GKN):
        g, row0 = plan.group_P[i], plan.row0_P[i]
        lhs_TK = jax.lax.dynamic_slice_in_dim(lhs_MK, row0, tile_rows, 0)
        grad_TN = jax.lax.dynamic_slice_in_dim(grad_MN, row0, tile_rows, 0)
        mine_T1 = _owned_rows(plan, i, tile_rows)
        lhs_TK = jnp.where(mine_T1, lhs_TK, jnp.zeros_like(lhs_TK))
        part_KN = jnp.einsum("tk,tn->kn", lhs_TK, grad_TN, preferred_element_type=acc_dtype)
        acc_KN = jax.lax.dynamic_index_in_dim(acc_GKN, g, 0, keepdims=False)
        return jax.lax.dynamic_update_index_in_dim(acc_GKN, acc_KN + part_KN, g, 0)

    acc_GKN = jnp.zeros((num_groups, k_dim, n_dim), acc_dtype)
    return jax.lax.fori_loop(0, plan.num_tiles, body, acc_GKN).astype(out_dtype)


def _check_shapes(name, lhs, other, group_sizes, other_name, other_rank):
    if lhs.ndim != 2:
        raise ValueError(f"{name}: lhs must be [M, K], got shape {lhs.shape}")
    if other.ndim != other_rank:
        raise ValueError(f"{name}: {other_name} must have rank {other_rank}, got shape {other.shape}")
    if group_sizes.ndim != 1 or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"{name}: group_sizes must be a 1-D integer array, "
                         f"got {group_sizes.dtype} of shape {group_sizes.shape}")


def _resolve_tile_rows(tile_rows, num_rows, num_groups) -> int:
    if tile_rows is None:
        return default_tile_rows(num_rows, num_groups)
    if not isinstance(tile_rows, int) or tile_rows < 1:
        raise ValueError(f"tile_rows must be a positive int or None, got {tile_rows!r}")
    return min(tile_rows, num_rows)


def gmm_xla(lhs_MK: Float[Array, "M K"], rhs_GKN: Float[Array, "G K N"],
            group_sizes_G: Integer[Array, " G"], preferred_element_type=None,
            tile_rows: int | None = None) -> Float[Array, "M N"]:
    """Grouped matmul (steps 1-3), differentiable w.r.t. lhs and rhs (steps 4-5)."""
    _check_shapes("gmm", lhs_MK, rhs_GKN, group_sizes_G, "rhs", 3)
    if rhs_GKN.shape[1] != lhs_MK.shape[1] or rhs_GKN.shape[0] != group_sizes_G.shape[0]:
        raise ValueError(f"gmm: shapes lhs {lhs_MK.shape}, rhs {rhs_GKN.shape}, group_sizes "
                         f"{group_sizes_G.shape} do not match [M,K] x [G,K,N] with [G] sizes")
    if lhs_MK.shape[0] == 0:
        return jnp.zeros((0, rhs_GKN.shape[2]), preferred_element_type or lhs_MK.dtype)
    tile = _resolve_tile_rows(tile_rows, lhs_MK.shape[0], rhs_GKN.shape[0])
    out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(lhs_MK, rhs_GKN))
    return _gmm_vjp(lhs_MK, rhs_GKN, group_sizes_G, out_dtype, tile)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gmm_vjp(lhs_MK, rhs_GKN, group_sizes_G, out_dtype, tile_rows):
    plan = tile_plan(group_sizes_G, lhs_MK.shape[0], tile_rows)
    return _grouped_matmul(lhs_MK, rhs_GKN, plan, tile_rows, out_dtype)


def _gmm_fwd(lhs_MK, rhs_GKN, group_sizes_G, out_dtype, tile_rows):
    plan = tile_plan(group_sizes_G, lhs_MK.shape[0], tile_rows)
    out_MN = _grouped_matmul(lhs_MK, rhs_GKN, plan, tile_rows, out_dtype)
    return out_MN, (lhs_MK, rhs_GKN, group_sizes_G, plan)


def _gmm_bwd(out_dtype, tile_rows, residuals, grad_MN):
    del out_dtype
    lhs_MK, rhs_GKN, group_sizes_G, plan = residuals
    dlhs_MK = _grouped_matmul(grad_MN, rhs_GKN, plan, tile_rows, lhs_MK.dtype, contract_rhs_dim=2)
    drhs_GKN = _grouped_weight_grad(lhs_MK, grad_MN, plan, tile_rows, rhs_GKN.shape[0],
                                    rhs_GKN.dtype)
    return dlhs_MK, drhs_GKN, None


_gmm_vjp.defvjp(_gmm_fwd, _gmm_bwd)


def tgmm_xla(lhs_MK: Float[Array, "M K"], grad_MN: Float[Array, "M N"],
             group_sizes_G: Integer[Array, " G"], preferred_element_type=None,
             tile_rows: int | None = None) -> Float[Array, "G K N"]:
    """Per-group ``lhs^T @ grad`` -> [G, K, N] (step 5 on its own)."""
    _check_shapes("tgmm", lhs_MK, grad_MN, group_sizes_G, "grad", 2)
    if grad_MN.shape[0] != lhs_MK.shape[0]:
        raise ValueError(f"tgmm: lhs {lhs_MK.shape} and grad {grad_MN.shape} need the same rows")
    num_groups = group_sizes_G.shape[0]
    out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(lhs_MK, grad_MN))
    if lhs_MK.shape[0] == 0:
        return jnp.zeros((num_groups, lhs_MK.shape[1], grad_MN.shape[1]), out_dtype)
    tile = _resolve_tile_rows(tile_rows, lhs_MK.shape[0], num_groups)
    plan = tile_plan(group_sizes_G, lhs_MK.shape[0], tile)
    return _grouped_weight_grad(lhs_MK, grad_MN, plan, tile, num_groups, out_dtype)
