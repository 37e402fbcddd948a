"""Differentiable Pallas grouped matmul: kernel choice per platform plus a custom_vjp.

For out[M,N] = gmm(lhs[M,K], rhs[G,K,N], group_sizes) with cotangent d_out[M,N]:
  1. d_lhs = gmm(d_out, rhs^T)  -- the same kernel, reading rhs as [G,N,K] tiles
     (no transposed copy of the weights is made);
  2. d_rhs = tgmm(lhs, d_out)   -- per-group lhs^T @ d_out, zeros for empty groups;
  3. group_sizes is integer data: no cotangent.
Rows past sum(group_sizes) get zero output, so their d_lhs is zero as well.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from kernels_pallas.gmm import gpu, tpu
from kernels_pallas.gmm.reference import gmm_reference, tgmm_reference
from kernels_pallas.gmm.tiling import (GmmTiling, check_gpu_tiling, check_tpu_tiling,
                                       default_gpu_tiling, default_tpu_tiling)
from kernels_pallas.lowering import per_lowering_platform

PLATFORMS = (None, "tpu", "gpu")


@dataclasses.dataclass(frozen=True)
class KernelChoice:
    """Which kernel runs and how. platform None: the running backend's kernel; traced on
    a CPU host with interpret=False, each platform's kernel where the code is lowered for
    it (kernels_pallas.lowering: ``jax.export(..., platforms=['tpu'])``), and an error
    where it is lowered for the CPU. A multi-platform export (``platforms=['tpu',
    'cuda']``) carries each platform's own kernel."""

    tiling: GmmTiling | None = None
    interpret: bool = False
    platform: str | None = None

    def __post_init__(self):
        if self.platform not in PLATFORMS:
            raise ValueError(f"platform must be one of {PLATFORMS}, got {self.platform!r}")

    def transposed(self):
        """The choice for the d_lhs product, whose contraction is N and output is K."""
        if self.tiling is None:
            return self
        t = self.tiling
        return dataclasses.replace(self, tiling=GmmTiling(tm=t.tm, tk=t.tn, tn=t.tk))


def _sublane(dtype):
    return {4: 8, 2: 16, 1: 32}.get(jnp.dtype(dtype).itemsize, 8)


def _per_platform(choice, tpu_fn, gpu_fn, fallback_fn, *args):
    if choice.platform == "tpu" or (choice.platform is None and choice.interpret):
        return tpu_fn(*args)
    if choice.platform == "gpu":
        return gpu_fn(*args)
    backend = jax.default_backend()
    if backend in ("tpu", "gpu"):
        return (tpu_fn if backend == "tpu" else gpu_fn)(*args)
    # A compiled kernel traced on another host (jax.export for TPU/GPU): each platform's
    # kernel is traced where it is lowered; run here, it is an error, not the reference.
    return per_lowering_platform(
        fallback_fn, {"tpu": tpu_fn, "gpu": gpu_fn}, *args,
        cpu_error=f"compiled Pallas kernels (interpret=False) run on TPU/GPU only, not on "
                  f"{backend}: use interpret=True to run them here, or backend='xla'")


def run_gmm(choice, lhs_MK, rhs_GKN, group_sizes_G, out_dtype, *, transpose_rhs=False,
            rhs_scale_GN=None):
    """Forward grouped matmul with the chosen kernel (no custom_vjp: see gmm_pallas)."""
    m, k = lhs_MK.shape
    n = rhs_GKN.shape[1] if transpose_rhs else rhs_GKN.shape[2]
    kw = dict(out_dtype=out_dtype, interpret=choice.interpret, transpose_rhs=transpose_rhs)

    def on_tpu(lhs, rhs, sizes, scale):
        tiling = choice.tiling or default_tpu_tiling(m, k, n, sublane=_sublane(lhs.dtype))
        if not choice.interpret:
            check_tpu_tiling(tiling, m, k, n, sublane=_sublane(lhs.dtype))
        return tpu.gmm_tpu(lhs, rhs, sizes, tiling=tiling, rhs_scale_GN=scale, **kw)

    def on_gpu(lhs, rhs, sizes, scale):
        tiling = choice.tiling or default_gpu_tiling(m, k, n)
        if not choice.interpret:
            check_gpu_tiling(tiling)
        return gpu.gmm_gpu(lhs, rhs, sizes, tiling=tiling, rhs_scale_GN=scale, **kw)

    def fallback(lhs, rhs, sizes, scale):
        rhs = jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs
        if scale is not None:
            rhs = rhs.astype(jnp.float32) * scale[:, None, :]
        return gmm_reference(lhs, rhs.astype(lhs.dtype), sizes, out_dtype)

    return _per_platform(choice, on_tpu, on_gpu, fallback,
                         lhs_MK, rhs_GKN, group_sizes_G, rhs_scale_GN)


def run_tgmm(choice, lhs_MK, grad_MN, group_sizes_G, out_dtype):
    """Per-group lhs^T @ grad -> [G, K, N] with the chosen kernel."""
    m, k = lhs_MK.shape
    n = grad_MN.shape[1]

    def on_tpu(lhs, grad, sizes):
        tiling = choice.tiling or default_tpu_tiling(m, k, n, sublane=_sublane(lhs.dtype))
        if not choice.interpret:
            check_tpu_tiling(tiling, m, k, n, sublane=_sublane(lhs.dtype))
        return tpu.tgmm_tpu(lhs, grad, sizes, tiling=tiling, out_dtype=out_dtype,
                            interpret=choice.interpret)

    def on_gpu(lhs, grad, sizes):
        tiling = choice.tiling or default_gpu_tiling(m, k, n)
        if not choice.interpret:
            check_gpu_tiling(tiling)
        return gpu.tgmm_gpu(lhs, grad, sizes, tiling=tiling, out_dtype=out_dtype,
                            interpret=choice.interpret)

    def fallback(lhs, grad, sizes):
        return tgmm_reference(lhs, grad, sizes, out_dtype)

    return _per_platform(choice, on_tpu, on_gpu, fallback, lhs_MK, grad_MN, group_sizes_G)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def gmm_pallas(lhs_MK, rhs_GKN, group_sizes_G, out_dtype, choice):
    """Differentiable Pallas gmm (operands already validated and of one dtype)."""
    return run_gmm(choice, lhs_MK, rhs_GKN, group_sizes_G, out_dtype)


def _gmm_fwd(lhs_MK, rhs_GKN, group_sizes_G, out_dtype, choice):
    out_MN = run_gmm(choice, lhs_MK, rhs_GKN, group_sizes_G, out_dtype)
    return out_MN, (lhs_MK, rhs_GKN, group_sizes_G)


def gmm_bwd(out_dtype, choice, residuals, d_out_MN):
    lhs_MK, rhs_GKN, group_sizes_G = residuals
    # Matmul inputs in the operands' dtype; every kernel accumulates in float32.
    d_out_MN = d_out_MN.astype(lhs_MK.dtype)
    d_lhs_MK = run_gmm(choice.transposed(), d_out_MN, rhs_GKN, group_sizes_G, lhs_MK.dtype,
                       transpose_rhs=True)
    d_rhs_GKN = run_tgmm(choice, lhs_MK, d_out_MN, group_sizes_G, rhs_GKN.dtype)
    return d_lhs_MK, d_rhs_GKN, None


gmm_pallas.defvjp(_gmm_fwd, gmm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def tgmm_pallas(lhs_MK, grad_MN, group_sizes_G, out_dtype, choice):
    """Differentiable Pallas tgmm: d_lhs = gmm(grad, d_out^T), d_grad = gmm(lhs, d_out)."""
    return run_tgmm(choice, lhs_MK, grad_MN, group_sizes_G, out_dtype)


def _tgmm_fwd(lhs_MK, grad_MN, group_sizes_G, out_dtype, choice):
    out_GKN = run_tgmm(choice, lhs_MK, grad_MN, group_sizes_G, out_dtype)
    return out_GKN, (lhs_MK, grad_MN, group_sizes_G)


def tgmm_bwd(out_dtype, choice, residuals, d_out_GKN):
    lhs_MK, grad_MN, group_sizes_G = residuals
    d_out_GKN = d_out_GKN.astype(lhs_MK.dtype)
    # d_lhs[M,K] contracts N against d_out[G,K,N] read as [G,N,K]^T; d_grad[M,N] contracts K.
    d_lhs_MK = run_gmm(choice.transposed(), grad_MN, d_out_GKN, group_sizes_G, lhs_MK.dtype,
                       transpose_rhs=True)
    d_grad_MN = run_gmm(choice, lhs_MK, d_out_GKN, group_sizes_G, grad_MN.dtype)
    return d_lhs_MK, d_grad_MN, None


tgmm_pallas.defvjp(_tgmm_fwd, tgmm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def gmm_int8_pallas(lhs_MK, rhs_GKN, scale_GN, group_sizes_G, out_dtype, choice):
    """Differentiable int8-weight gmm: out = gmm(lhs, rhs * scale[:, None, :]).

    d_lhs = gmm(d_out * scale[group of row], rhs^T) keeps the weights int8;
    d_scale[g, n] = sum_k tgmm(lhs, d_out)[g, k, n] * rhs[g, k, n] (XLA drops
    it when unused); the int8 weights themselves get no cotangent.
    """
    return run_gmm(choice, lhs_MK, rhs_GKN, group_sizes_G, out_dtype, rhs_scale_GN=scale_GN)


def _int8_fwd(lhs_MK, rhs_GKN, scale_GN, group_sizes_G, out_dtype, choice):
    out_MN = run_gmm(choice, lhs_MK, rhs_GKN, group_sizes_G, out_dtype, rhs_scale_GN=scale_GN)
    return out_MN, (lhs_MK, rhs_GKN, scale_GN, group_sizes_G)


def gmm_int8_bwd(out_dtype, choice, residuals, d_out_MN):
    lhs_MK, rhs_GKN, scale_GN, group_sizes_G = residuals
    m, num_groups = lhs_MK.shape[0], rhs_GKN.shape[0]
    ends_G = jnp.minimum(jnp.cumsum(group_sizes_G.astype(jnp.int32)), m)
    group_of_row_M = jnp.minimum(
        jnp.searchsorted(ends_G, jnp.arange(m, dtype=jnp.int32), side="right"), num_groups - 1)
    d_out_MN = d_out_MN.astype(jnp.float32)
    scaled_d_out_MN = (d_out_MN * scale_GN[group_of_row_M]).astype(lhs_MK.dtype)
    d_lhs_MK = run_gmm(choice.transposed(), scaled_d_out_MN, rhs_GKN, group_sizes_G,
                       lhs_MK.dtype, transpose_rhs=True)
    d_weight_GKN = run_tgmm(choice, lhs_MK, d_out_MN.astype(lhs_MK.dtype), group_sizes_G,
                            jnp.dtype(jnp.float32))
    d_scale_GN = jnp.einsum("gkn,gkn->gn", d_weight_GKN, rhs_GKN.astype(jnp.float32))
    return d_lhs_MK, None, d_scale_GN.astype(scale_GN.dtype), None


gmm_int8_pallas.defvjp(_int8_fwd, gmm_int8_bwd)
