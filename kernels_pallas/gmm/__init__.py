"""Grouped matmul: ``gmm(lhs[M,K], rhs[G,K,N], group_sizes[G]) -> [M,N]``.

Rows of lhs are sorted by group; group g (``group_sizes[g]`` rows) is
multiplied by ``rhs[g]``; rows past ``sum(group_sizes)`` give zeros.

- ``gmm`` / ``tgmm`` (per-group ``lhs^T @ grad`` -> [G,K,N], the weight
  gradient): differentiable; ``backend='auto'`` runs the Pallas kernel on
  TPU (tpu.py, Mosaic) or GPU (gpu.py, Triton) and the XLA path on CPU,
  chosen per lowering platform (kernels_pallas.lowering: a ``jax.jit`` on a
  CPU host never traces the kernels, an export for TPU/GPU carries them).
- ``gmm_int8(lhs, rhs_int8, rhs_scale[G,N], group_sizes)``: weight-only int8
  experts for serving, dequantized inside the kernel; gradients for lhs
  and rhs_scale (the int8 weights are frozen).
- ``GmmTiling(tm, tk, tn)``: block sizes; None picks a per-platform default.

Files: reference.py (ragged_dot; the fallback), metadata.py (group -> tile
work items), tpu.py / gpu.py (kernels), vjp.py (kernel choice + custom_vjp),
tiling.py, validate.py, ops.py (public entry points).
"""

from kernels_pallas.gmm.ops import gmm, gmm_int8, tgmm
from kernels_pallas.gmm.tiling import GmmTiling

__all__ = ["GmmTiling", "gmm", "gmm_int8", "tgmm"]
