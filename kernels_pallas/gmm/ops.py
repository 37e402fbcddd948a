"""Public entry points: pick a backend and call it."""

import jax

from kernels_pallas.gmm.reference import gmm_reference, tgmm_reference
from kernels_pallas.gmm.xla import gmm_xla, tgmm_xla

BACKENDS = ("auto", "pallas", "xla", "reference")


def gmm(lhs, rhs, group_sizes, *, preferred_element_type=None, tiling=None,
        backend="auto", interpret=None):
    """Grouped matmul; rows of ``lhs`` are grouped contiguously, group g uses ``rhs[g]``.

    backend: 'pallas' (TPU/GPU kernel; interpret mode elsewhere), 'xla' (the
    fast XLA path used on CPU), 'reference' (jax.lax.ragged_dot), 'auto'
    (Pallas on TPU/GPU, 'xla' on CPU).
    """
    if backend not in BACKENDS:
        raise ValueError(f"gmm: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "xla" or (backend == "auto" and _on_cpu()):
        return gmm_xla(lhs, rhs, group_sizes, preferred_element_type)
    del tiling, interpret  # used by the Pallas kernels (work in progress)
    return gmm_reference(lhs, rhs, group_sizes, preferred_element_type)


def tgmm(lhs, grad, group_sizes, *, preferred_element_type=None, tiling=None,
         backend="auto", interpret=None):
    """Per-group ``lhs^T @ grad`` -> [G, K, N]: the weight gradient of ``gmm``."""
    if backend not in BACKENDS:
        raise ValueError(f"tgmm: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "xla" or (backend == "auto" and _on_cpu()):
        return tgmm_xla(lhs, grad, group_sizes, preferred_element_type)
    del tiling, interpret
    return tgmm_reference(lhs, grad, group_sizes, preferred_element_type)


def _on_cpu() -> bool:
    # ragged_dot on XLA:CPU runs many times slower than a dense matmul; the
    # tile loop of gmm/xla.py does not.
    return jax.default_backend() == "cpu"
