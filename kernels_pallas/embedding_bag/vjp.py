"""custom_vjp shared by the Pallas and XLA forwards.

The forward and the weights gradient come from the chosen backend; the table
gradient is always the sorted segment reduction of ``backward.table_grad``
(deterministic, no scatter-add over duplicate rows).
"""

import dataclasses
import functools
from typing import Callable

import jax

from kernels_pallas.embedding_bag.backward import table_grad


@dataclasses.dataclass(frozen=True)
class BagBackend:
    """forward(table, ids, weights) -> [T, D]; weights_grad(g, table, ids, dtype) -> [T, k]."""

    forward: Callable
    weights_grad: Callable


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def embedding_bag_vjp(table_ND, ids_Tk, weights_Tk, backend):
    """``out[t] = sum_j weights[t, j] * table[ids[t, j]]``; ids must be in range."""
    return backend.forward(table_ND, ids_Tk, weights_Tk)


def _forward(table_ND, ids_Tk, weights_Tk, backend):
    out_TD = backend.forward(table_ND, ids_Tk, weights_Tk)
    return out_TD, (table_ND, ids_Tk, weights_Tk)


def _backward(backend, residuals, grad_TD):
    table_ND, ids_Tk, weights_Tk = residuals
    d_table_ND = table_grad(grad_TD, ids_Tk, weights_Tk, table_ND.shape[0], table_ND.dtype)
    d_weights_Tk = backend.weights_grad(grad_TD, table_ND, ids_Tk, weights_Tk.dtype)
    return d_table_ND, None, d_weights_Tk


embedding_bag_vjp.defvjp(_forward, _backward)
