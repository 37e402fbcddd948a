"""Pallas kernels for moejax. Depends on jax only (never on moejax).

Each op has its own folder: a pure-jnp ``reference.py`` (also the XLA
fallback), the Pallas kernel(s), and a small ``custom_vjp`` module.
"""

from kernels_pallas.embedding_bag import embedding_bag
from kernels_pallas.gmm import gmm, gmm_int8, tgmm

__all__ = ["embedding_bag", "gmm", "gmm_int8", "tgmm"]
