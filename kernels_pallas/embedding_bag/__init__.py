"""Embedding bag: ``embedding_bag(table[N,D], indices[T,k], weights[T,k]) -> [T,D]``.

The weighted gather-sum of memory layers (product-key memory, hashed n-gram
memory). Files: ``reference.py`` (pure jnp, also the XLA fallback),
``pallas_tpu.py`` (TPU kernels: row DMAs from HBM, float32 sums in VMEM),
``pallas_gpu.py`` (Triton kernels: gathered loads, float32 sums in registers),
``backward.py`` (sorted, scatter-free gradients) and ``vjp.py`` (custom_vjp).
"""

from kernels_pallas.embedding_bag.ops import BACKENDS, embedding_bag
from kernels_pallas.embedding_bag.reference import embedding_bag_reference

__all__ = ["BACKENDS", "embedding_bag", "embedding_bag_reference"]
