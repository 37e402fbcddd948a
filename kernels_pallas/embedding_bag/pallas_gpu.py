"""GPU Pallas (Triton) kernels: gather table rows with vector loads, reduce in registers.

Triton has no DMA engine to drive: each program loads the rows it needs
straight from global memory with a gathered load ``table[ids_b, d-slice]``.

1. ``forward``: program (i, c) owns tokens [i*bt, (i+1)*bt) and columns
   [c*bd, (c+1)*bd); for j < k it loads the [bt] ids and weights of slot j,
   gathers the [bt, bd] rows and adds ``w * rows`` to a float32 accumulator.
2. ``weights_grad``: program i owns bt tokens; for each slot j and column
   chunk it adds ``sum_d g * rows`` into a [bt] float32 dot, then stores
   column j of ``dw``.

Triton needs power-of-two block sizes, so bt = 16 (tokens are padded with
weight-0 bags reading row 0) and bd is the largest power of two dividing D,
at most 256 (no ragged column edge to mask). Indices must be in range.
Exported for CUDA (``__gpu$xla.gpu.triton`` custom call); not yet run on a GPU.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels_pallas.shard_map_types import out_struct

BLOCK_TOKENS = 16
MAX_BLOCK_COLS = 256


def block_cols(d):
    """Largest power of two dividing d, at most MAX_BLOCK_COLS."""
    return min(d & -d, MAX_BLOCK_COLS)


def _forward_kernel(ids_ref, w_ref, table_ref, out_ref, *, k):
    bt, bd = out_ref.shape
    tokens = pl.ds(pl.program_id(0) * bt, bt)
    cols = pl.ds(pl.program_id(1) * bd, bd)

    def slot(j, acc_bD):
        w_b = w_ref[tokens, j].astype(jnp.float32)
        rows_bD = table_ref[ids_ref[tokens, j], cols].astype(jnp.float32)
        return acc_bD + w_b[:, None] * rows_bD
    acc_bD = jax.lax.fori_loop(0, k, slot, jnp.zeros((bt, bd), jnp.float32))
    out_ref[...] = acc_bD.astype(out_ref.dtype)


def _weights_grad_kernel(ids_ref, g_ref, table_ref, out_ref, *, k, bt, bd):
    tokens = pl.ds(pl.program_id(0) * bt, bt)
    d = table_ref.shape[1]

    def slot(j, carry):
        ids_b = ids_ref[tokens, j]

        def chunk(c, dot_b):
            cols = pl.ds(c * bd, bd)
            rows_bD = table_ref[ids_b, cols].astype(jnp.float32)
            return dot_b + jnp.sum(rows_bD * g_ref[tokens, cols].astype(jnp.float32), axis=1)
        dot_b = jax.lax.fori_loop(0, d // bd, chunk, jnp.zeros((bt,), jnp.float32))
        out_ref[tokens, j] = dot_b
        return carry
    jax.lax.fori_loop(0, k, slot, 0)


def _pad_tokens(*arrays_T):
    num_tokens = arrays_T[0].shape[0]
    padded = pl.cdiv(num_tokens, BLOCK_TOKENS) * BLOCK_TOKENS
    pad = ((0, padded - num_tokens), (0, 0))
    return padded, [jnp.pad(x, pad) for x in arrays_T]


# jit with static dtypes: eager callers then reuse one compiled kernel instead of
# re-tracing (and re-compiling) a fresh pallas_call on every call.
@functools.partial(jax.jit, static_argnames=("out_dtype", "interpret"))
def forward(table_ND, ids_Tk, weights_Tk, out_dtype, interpret=False):
    """[N, D], in-range [T, k] ids, [T, k] weights -> [T, D] in out_dtype."""
    num_tokens, k = ids_Tk.shape
    d = table_ND.shape[1]
    bd = block_cols(d)
    padded, (ids_Tk, weights_Tk) = _pad_tokens(ids_Tk.astype(jnp.int32),
                                               weights_Tk.astype(jnp.float32))
    whole = pl.BlockSpec(memory_space=pl.ANY)
    out = pl.pallas_call(
        functools.partial(_forward_kernel, k=k),
        out_shape=out_struct((padded, d), out_dtype, weights_Tk),
        grid=(padded // BLOCK_TOKENS, d // bd),
        in_specs=[whole, whole, whole],
        out_specs=pl.BlockSpec((BLOCK_TOKENS, bd), lambda i, c: (i, c)),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="embedding_bag_gpu",
    )(ids_Tk, weights_Tk, table_ND)
    return out[:num_tokens]


@functools.partial(jax.jit, static_argnames=("weights_dtype", "interpret"))
def weights_grad(grad_TD, table_ND, ids_Tk, weights_dtype, interpret=False):
    """d weights [T, k] = <grad[t], table[ids[t, j]]> in float32, cast to weights_dtype."""
    num_tokens, k = ids_Tk.shape
    padded, (ids_Tk, grad_TD) = _pad_tokens(ids_Tk.astype(jnp.int32), grad_TD)
    whole = pl.BlockSpec(memory_space=pl.ANY)
    out = pl.pallas_call(
        functools.partial(_weights_grad_kernel, k=k, bt=BLOCK_TOKENS,
                          bd=block_cols(table_ND.shape[1])),
        out_shape=out_struct((padded, k), jnp.float32, grad_TD),
        grid=(padded // BLOCK_TOKENS,),
        in_specs=[whole, whole, whole],
        out_specs=whole,
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="embedding_bag_dweights_gpu",
    )(ids_Tk, grad_TD, table_ND)
    return out[:num_tokens].astype(weights_dtype)
