"""Grouped matmul: ``gmm(lhs[M,K], rhs[G,K,N], group_sizes[G]) -> [M,N]``."""

from kernels_pallas.gmm.ops import gmm, gmm_int8, tgmm
from kernels_pallas.gmm.tiling import GmmTiling

__all__ = ["GmmTiling", "gmm", "gmm_int8", "tgmm"]
