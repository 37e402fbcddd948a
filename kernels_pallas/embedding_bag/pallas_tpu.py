"""TPU Pallas kernels: gather table rows by DMA, reduce them in VMEM.

Both kernels walk the tokens in blocks of ``bt``. For each block:

1. The ``bt * k`` row ids sit in SMEM (scalar prefetch). One DMA per row copies
   ``table[idx[t, j]]`` from HBM (the table never leaves ``pl.ANY``) into the
   VMEM buffer ``rows[slot, j, t, :]``; the buffer has two slots, and the DMAs
   of block b + 1 are started before block b is reduced, so the copies of the
   next block overlap the arithmetic of this one.
2. ``forward``: ``out[t] = sum_j w[t, j] * rows[j, t]`` in float32; each term
   is a dense multiply-add over one tile of tokens (8 rows for f32, 16 for
   bf16, on sublanes) by D (on lanes), so the sums stay in registers.
   ``weights_grad``: ``dw[t, j] = <g[t], rows[j, t]>`` in float32.

The grid is (splits, blocks per split): the first axis is parallel (the two
TensorCores of a megacore chip take one half of the tokens each) and the
second is sequential, which the cross-step prefetch needs.

Row ids live in SMEM (1 MiB on v4 and later), so one call takes at most
``MAX_IDS_PER_CALL`` of them; longer inputs are cut into several calls.
Indices must already be clamped into range: a DMA does not check bounds.

Not yet run on a TPU (only exported for one, and run in interpret mode). The
riskiest part is the one-row DMA of a 16-bit table: it lands on a single
sublane of a packed (16, 128) VMEM tile, which Mosaic may reject at compile
time; if so, route 16-bit tables to backend='xla' or copy row pairs as u32.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.shard_map_types import interpret_mode, out_struct

MAX_IDS_PER_CALL = 2**16  # 256 KiB of int32 in SMEM
ROWS_VMEM_BYTES = 8 * 2**20  # both slots of the row buffer


def sublane_multiple(dtype):
    """Rows of one VMEM tile: 8 for 32-bit, 16 for 16-bit dtypes."""
    return 8 * max(1, 4 // jnp.dtype(dtype).itemsize)


def choose_block_tokens(num_tokens, k, d, dtype):
    """Power-of-two token block: both row slots fit ROWS_VMEM_BYTES, and there are
    about four blocks or more (two per TensorCore, so that the prefetch of the
    next block has something to overlap with), but never fewer rows than a tile."""
    step = sublane_multiple(dtype)
    fit = ROWS_VMEM_BYTES // (2 * k * d * jnp.dtype(dtype).itemsize)
    bt = step
    while bt * 2 <= min(fit, 256, num_tokens // 4):
        bt *= 2
    return bt


def _row_copies(ids_ref, table_hbm, rows_vmem, sems, block, slot, bt, k):
    """p -> the DMA of row p (of bt * k) of token block `block` into slot `slot`."""
    base = block * bt * k

    def copy(p):
        # lax.div/rem: p >= 0, and jnp's floor division needs sign(), which Mosaic
        # lowers only when it knows the chip.
        t, j = jax.lax.div(p, k), jax.lax.rem(p, k)
        row = ids_ref[base + p]
        return pltpu.make_async_copy(table_hbm.at[pl.ds(row, 1)],
                                     rows_vmem.at[slot, j, pl.ds(t, 1)], sems.at[slot])
    return copy


def _for_each_row(n, fn):
    def body(p, carry):
        fn(p)
        return carry
    jax.lax.fori_loop(0, n, body, 0)


def _fetch_rows(ids_ref, table_hbm, rows_vmem, sems, bt, k):
    """Start the next block's copies, wait for this block's; returns this block's slot."""
    split, b, blocks = pl.program_id(0), pl.program_id(1), pl.num_programs(1)
    block = split * blocks + b
    slot = jax.lax.rem(b, jnp.int32(2))  # int32 also under jax_enable_x64
    copy_this = _row_copies(ids_ref, table_hbm, rows_vmem, sems, block, slot, bt, k)
    copy_next = _row_copies(ids_ref, table_hbm, rows_vmem, sems, block + 1, 1 - slot, bt, k)

    @pl.when(b == 0)
    def _():
        _for_each_row(bt * k, lambda p: copy_this(p).start())

    @pl.when(b + 1 < blocks)
    def _():
        _for_each_row(bt * k, lambda p: copy_next(p).start())

    _for_each_row(bt * k, lambda p: copy_this(p).wait())
    return slot


def _for_each_tile(bt, step, fn):
    """fn(rows) for each tile-aligned slice of `step` tokens: the float32 sums of a
    [step, D] slice stay in vector registers instead of spilling a [bt, D] one."""
    def body(i, carry):
        fn(pl.ds(pl.multiple_of(i * step, step), step))
        return carry
    jax.lax.fori_loop(0, bt // step, body, 0)


def _forward_kernel(ids_ref, w_ref, table_hbm, out_ref, rows_vmem, sems, *, bt, k, step):
    slot = _fetch_rows(ids_ref, table_hbm, rows_vmem, sems, bt, k)

    def tile(tokens):
        w_sk = w_ref[tokens, :].astype(jnp.float32)
        acc_sD = jnp.zeros((step, out_ref.shape[1]), jnp.float32)
        for j in range(k):  # k is small (memory layers: 32); unrolled, dense [step, D] FMAs
            acc_sD += w_sk[:, j:j + 1] * rows_vmem[slot, j, tokens, :].astype(jnp.float32)
        out_ref[tokens, :] = acc_sD.astype(out_ref.dtype)
    _for_each_tile(bt, step, tile)


def _weights_grad_kernel(ids_ref, g_ref, table_hbm, out_ref, rows_vmem, sems, *, bt, k, step):
    slot = _fetch_rows(ids_ref, table_hbm, rows_vmem, sems, bt, k)

    def tile(tokens):
        g_sD = g_ref[tokens, :].astype(jnp.float32)
        lane_sk = jax.lax.broadcasted_iota(jnp.int32, (step, k), 1)
        dw_sk = jnp.zeros((step, k), jnp.float32)
        for j in range(k):
            row_sD = rows_vmem[slot, j, tokens, :].astype(jnp.float32)
            dot_s1 = jnp.sum(g_sD * row_sD, axis=1, keepdims=True)
            dw_sk = jnp.where(lane_sk == j, dot_s1, dw_sk)
        out_ref[tokens, :] = dw_sk.astype(out_ref.dtype)
    _for_each_tile(bt, step, tile)


def _bag_call(kernel, table_ND, ids_Tk, per_token_TX, out_cols, out_dtype, interpret):
    """One pallas_call over all tokens (ids already in range, T*k <= MAX_IDS_PER_CALL)."""
    num_tokens, k = ids_Tk.shape
    d = table_ND.shape[1]
    bt = choose_block_tokens(num_tokens, k, d, table_ND.dtype)
    blocks = pl.cdiv(num_tokens, bt)
    splits = 2 if blocks >= 2 else 1
    blocks_per_split = pl.cdiv(blocks, splits)
    padded = splits * blocks_per_split * bt
    pad = ((0, padded - num_tokens), (0, 0))
    ids_P = jnp.pad(ids_Tk, pad).reshape(-1)  # padded tokens read row 0, weight 0
    per_token_TX = jnp.pad(per_token_TX, pad)
    block_of = lambda s, b, ids: (s * blocks_per_split + b, 0)  # noqa: E731
    rows_bytes = 2 * k * bt * d * table_ND.dtype.itemsize
    out = pl.pallas_call(
        functools.partial(kernel, bt=bt, k=k, step=sublane_multiple(table_ND.dtype)),
        out_shape=out_struct((padded, out_cols), out_dtype, per_token_TX),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(splits, blocks_per_split),
            in_specs=[pl.BlockSpec((bt, per_token_TX.shape[1]), block_of),
                      pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=pl.BlockSpec((bt, out_cols), block_of),
            scratch_shapes=[pltpu.VMEM((2, k, bt, d), table_ND.dtype),
                            pltpu.SemaphoreType.DMA((2,))]),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary"),
            vmem_limit_bytes=max(32 * 2**20, rows_bytes + 16 * 2**20)),
        interpret=interpret_mode(interpret, ids_P, per_token_TX, table_ND),
        cost_estimate=pl.CostEstimate(  # a gather: bytes, not flops, set the time
            flops=2 * padded * k * d, transcendentals=0,
            bytes_accessed=padded * (k * d * table_ND.dtype.itemsize + k * 4
                                     + (per_token_TX.shape[1] + out_cols) * 4)),
        name="embedding_bag" if kernel is _forward_kernel else "embedding_bag_dweights",
    )(ids_P, per_token_TX, table_ND)
    return out[:num_tokens]


def _in_calls(fn, ids_Tk, per_token_TX):
    """Cut the tokens so that each call's row ids fit in SMEM; concatenate the results."""
    num_tokens, k = ids_Tk.shape
    step = max(1, MAX_IDS_PER_CALL // k)
    if num_tokens <= step:
        return fn(ids_Tk, per_token_TX)
    parts = [fn(ids_Tk[s:s + step], per_token_TX[s:s + step])
             for s in range(0, num_tokens, step)]
    return jnp.concatenate(parts, axis=0)


# jit with static dtypes: eager callers then reuse one compiled kernel instead of
# re-tracing (and re-compiling) a fresh pallas_call on every call.
@functools.partial(jax.jit, static_argnames=("out_dtype", "interpret"))
def forward(table_ND, ids_Tk, weights_Tk, out_dtype, interpret=False):
    """[N, D], in-range [T, k] ids, [T, k] weights -> [T, D] in out_dtype."""
    call = lambda ids, w: _bag_call(_forward_kernel, table_ND, ids, w,  # noqa: E731
                                    table_ND.shape[1], out_dtype, interpret)
    return _in_calls(call, ids_Tk.astype(jnp.int32), weights_Tk.astype(jnp.float32))


@functools.partial(jax.jit, static_argnames=("weights_dtype", "interpret"))
def weights_grad(grad_TD, table_ND, ids_Tk, weights_dtype, interpret=False):
    """d weights [T, k] = <grad[t], table[ids[t, j]]> in float32, cast to weights_dtype."""
    k = ids_Tk.shape[1]
    call = lambda ids, g: _bag_call(_weights_grad_kernel, table_ND, ids, g,  # noqa: E731
                                    k, jnp.float32, interpret)
    return _in_calls(call, ids_Tk.astype(jnp.int32), grad_TD).astype(weights_dtype)
