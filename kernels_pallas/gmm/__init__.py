"""Grouped matmul: ``gmm(lhs[M,K], rhs[G,K,N], group_sizes[G]) -> [M,N]``."""

from kernels_pallas.gmm.ops import gmm, tgmm

__all__ = ["gmm", "tgmm"]
