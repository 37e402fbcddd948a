"""Gradients of the embedding bag, deterministic and free of scatter-adds.

Table gradient (``d table[n] = sum over (t, j) with idx[t, j] == n of
w[t, j] * g[t]``), without a scatter-add over duplicate rows (whose order of
additions, and so whose result, is not fixed on GPUs):

1. Flatten the ``T * k`` (row id, position) pairs and sort them by row id with
   a stable sort: equal ids keep their position order, so the order of the
   additions below depends on the inputs only.
2. Form the contributions ``w[t, j] * g[t]`` in sorted order (a gather).
3. Sum runs of equal ids with a segmented inclusive scan (``sorted_row_sums``,
   log2(longest run) shift-and-add steps): the last element of each run
   holds the run's total.
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


def sorted_row_sums(sorted_ids_P, values_PD):
    """Inclusive sums over runs of equal ``sorted_ids_P`` -> [P, D] f32.

    A Hillis-Steele scan that stops at run starts: after the step with offset
    s, position p holds the sum of its run over (p - 2s, p]. Only
    ceil(log2(longest run)) steps run (a while loop), each a shift, a mask
    and an add over [P, D]; the order of additions is fixed by the ids.
    """
    num = sorted_ids_P.shape[0]
    pos_P = jnp.arange(num, dtype=jnp.int32)
    run_start_P = jnp.searchsorted(sorted_ids_P, sorted_ids_P, side="left").astype(jnp.int32)
    longest_run = jnp.max(pos_P - run_start_P) + 1

    def step(carry):
        offset, sums_PD = carry
        # A clipped row gather rather than a padded slice: no [2P, D] copy per step
        # (same speed on XLA:CPU); rows before 0 are masked out below anyway.
        earlier_PD = jnp.take(sums_PD, jnp.maximum(pos_P - offset, 0), axis=0, mode="clip")
        same_run_P = pos_P - offset >= run_start_P
        return offset * 2, sums_PD + jnp.where(same_run_P[:, None], earlier_PD, 0)

    _, sums_PD = jax.lax.while_loop(lambda c: c[0] < longest_run, step,
                                    (jnp.int32(1), values_PD))
    return sums_PD


def table_grad(grad_TD, indices_Tk, weights_Tk, num_rows, table_dtype):
    """d table [N, D] of ``out = embedding_bag(table, indices, weights)``; indices in range."""
    k = indices_Tk.shape[1]
    ids_P = indices_Tk.reshape(-1).astype(jnp.int32)
    positions_P = jnp.arange(ids_P.shape[0], dtype=jnp.int32)
    sorted_ids_P, sorted_pos_P = jax.lax.sort((ids_P, positions_P), num_keys=1, is_stable=True)
    token_P = sorted_pos_P // k
    weight_P = jnp.take(weights_Tk.reshape(-1), sorted_pos_P, mode="clip").astype(jnp.float32)
    grad_PD = jnp.take(grad_TD, token_P, axis=0, mode="clip").astype(jnp.float32)
    contrib_PD = grad_PD * weight_P[:, None]
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
