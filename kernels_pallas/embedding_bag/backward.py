"""Gradients of the embedding bag, deterministic and free of scatter-adds.

Table gradient (``d table[n] = sum over (t, j) with idx[t, j] == n of
w[t, j] * g[t]``), without a scatter-add over duplicate rows (whose order of
additions, and so whose result, is not fixed on GPUs):

1. Flatten the ``T * k`` (row id, position) pairs and sort them by row id with
   a stable sort: equal ids keep their position order, so the order of the
   additions below depends on the inputs only.
2. Form the contributions ``w[t, j] * g[t]`` in sorted order (a gather).
3. Sum runs of equal ids with a segmented inclusive scan (an associative
   scan that restarts at every new id): the last element of each run holds
   the run's total.
4. For every table row n, find its run's end with a binary search in the
   sorted ids and gather that total (zero for rows that no token reads).

All steps are gathers, sorts and elementwise ops; the [N, D] result is
written densely, once.

Weights gradient: ``d w[t, j] = <g[t], table[idx[t, j]]>``, a gather and a
row-wise dot with float32 accumulation.
"""

import functools

import jax
import jax.numpy as jnp

from kernels_pallas.embedding_bag.reference import map_token_chunks


def _segmented_sum_op(left, right):
    """Associative op of a segmented sum: restart where `right` opens a new segment."""
    left_sum, left_start = left
    right_sum, right_start = right
    keep_left = jnp.logical_not(right_start)[..., None]
    return (right_sum + jnp.where(keep_left, left_sum, 0), left_start | right_start)


def sorted_row_sums(sorted_ids_P, values_PD):
    """Inclusive segmented sums over runs of equal ``sorted_ids_P`` -> [P, D] f32."""
    opens_P = jnp.concatenate([jnp.ones((1,), bool), sorted_ids_P[1:] != sorted_ids_P[:-1]])
    sums_PD, _ = jax.lax.associative_scan(_segmented_sum_op, (values_PD, opens_P))
    return sums_PD


def table_grad(grad_TD, indices_Tk, weights_Tk, num_rows, table_dtype):
    """d table [N, D] of ``out = embedding_bag(table, indices, weights)``; indices in range."""
    k = indices_Tk.shape[1]
    ids_P = indices_Tk.reshape(-1).astype(jnp.int32)
    positions_P = jnp.arange(ids_P.shape[0], dtype=jnp.int32)
    sorted_ids_P, sorted_pos_P = jax.lax.sort((ids_P, positions_P), num_keys=1, is_stable=True)
    token_P = sorted_pos_P // k
    weight_P = weights_Tk.reshape(-1)[sorted_pos_P].astype(jnp.float32)
    contrib_PD = jnp.take(grad_TD, token_P, axis=0, mode="clip").astype(jnp.float32) * weight_P[:, None]
    sums_PD = sorted_row_sums(sorted_ids_P, contrib_PD)
    rows_N = jnp.arange(num_rows, dtype=jnp.int32)
    run_end_N = jnp.searchsorted(sorted_ids_P, rows_N, side="right") - 1
    is_read_N = jnp.take(sorted_ids_P, jnp.maximum(run_end_N, 0), mode="clip") == rows_N
    row_sum_ND = jnp.take(sums_PD, jnp.maximum(run_end_N, 0), axis=0, mode="clip")
    return jnp.where(is_read_N[:, None], row_sum_ND, 0).astype(table_dtype)


def _row_dots(table_ND, grad_TD, indices_Tk):
    rows_TkD = jnp.take(table_ND, indices_Tk, axis=0, mode="clip")
    return jnp.einsum("tkd,td->tk", rows_TkD.astype(jnp.float32), grad_TD.astype(jnp.float32),
                      preferred_element_type=jnp.float32)


def weights_grad(grad_TD, table_ND, indices_Tk, weights_dtype):
    """d weights [T, k] = <grad[t], table[idx[t, j]]>, accumulated in float32."""
    dots_Tk = map_token_chunks(functools.partial(_row_dots, table_ND), (grad_TD, indices_Tk),
                               indices_Tk.shape[1], table_ND.shape[1])
    return dots_Tk.astype(weights_dtype)
