"""Public entry point: validate, clamp the indices, pick a backend."""

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Integer

from kernels_pallas.embedding_bag import backward, pallas_gpu, pallas_tpu
from kernels_pallas.embedding_bag.reference import clamp_indices, embedding_bag_reference
from kernels_pallas.embedding_bag.vjp import BagBackend, embedding_bag_vjp
from kernels_pallas.shard_map_types import match_varying

BACKENDS = ("auto", "pallas", "pallas_tpu", "pallas_gpu", "xla", "reference")


def _validate(table, indices, weights, backend):
    if backend not in BACKENDS:
        raise ValueError(f"embedding_bag: backend must be one of {BACKENDS}, got {backend!r}")
    if table.ndim != 2 or not jnp.issubdtype(table.dtype, jnp.floating):
        raise ValueError("embedding_bag: table must be a floating [N, D] array, got "
                         f"shape {table.shape} dtype {table.dtype}")
    if table.shape[0] == 0:
        raise ValueError("embedding_bag: table must have at least one row (N >= 1)")
    if indices.ndim != 2 or not jnp.issubdtype(indices.dtype, jnp.integer):
        raise ValueError("embedding_bag: indices must be an integer [T, k] array, got "
                         f"shape {indices.shape} dtype {indices.dtype}")
    if weights.ndim != 2 or not jnp.issubdtype(weights.dtype, jnp.floating):
        raise ValueError("embedding_bag: weights must be a floating [T, k] array, got "
                         f"shape {weights.shape} dtype {weights.dtype}")
    if weights.shape != indices.shape:
        raise ValueError(f"embedding_bag: weights shape {weights.shape} must equal indices "
                         f"shape {indices.shape} ([T, k])")
    if indices.shape[1] == 0:
        raise ValueError("embedding_bag: bags must hold at least one row (k >= 1)")


@functools.lru_cache(maxsize=None)
def _impl(backend, out_dtype, interpret):
    """One BagBackend per configuration, so that the custom_vjp sees the same
    (hashable, equal) object on every call and nothing is re-traced."""
    if backend == "xla":
        return BagBackend(
            forward=functools.partial(embedding_bag_reference, out_dtype=out_dtype),
            weights_grad=backward.weights_grad)
    kernels = {"pallas_tpu": pallas_tpu, "pallas_gpu": pallas_gpu}[backend]
    return BagBackend(
        forward=functools.partial(kernels.forward, out_dtype=out_dtype, interpret=interpret),
        weights_grad=functools.partial(kernels.weights_grad, interpret=interpret))


def embedding_bag(
    table: Float[Array, "N D"],
    indices: Integer[Array, "T k"],
    weights: Float[Array, "T k"],
    *,
    preferred_element_type=None,
    backend: str = "auto",
    interpret: bool | None = None,
) -> Float[Array, "T D"]:
    """Weighted gather-sum: ``out[t] = sum_j weights[t, j] * table[indices[t, j]]``.

    Sums accumulate in float32; the result has ``preferred_element_type``
    (default: the table dtype). Differentiable in ``table`` and ``weights``;
    the table gradient is a deterministic sorted segment reduction (no
    scatter-add), see ``backward.py``.

    Out-of-range indices are clamped into ``[0, N - 1]`` on every backend (as
    ``jnp.take(..., mode='clip')``): index -1 reads row 0, index N reads row
    N - 1, and the gradient flows to the row that was read. No error is
    raised, so that the behaviour is the same under jit.

    backend: 'pallas_tpu' (the TPU kernel), 'pallas_gpu' (the Triton kernel,
    lowered for CUDA but not yet run on a GPU), 'pallas' (the GPU kernel on a
    GPU, else the TPU one); off their platform the Pallas kernels run in
    interpret mode unless ``interpret=False`` (e.g. to export for that
    platform). 'xla': chunked jnp gather + einsum with the same deterministic
    backward. 'reference': plain jnp, differentiated by JAX. 'auto': Pallas on
    TPU, 'xla' elsewhere.
    """
    table, indices, weights = jnp.asarray(table), jnp.asarray(indices), jnp.asarray(weights)
    _validate(table, indices, weights, backend)
    out_dtype = jnp.dtype(preferred_element_type or table.dtype)
    if backend == "reference":
        return embedding_bag_reference(table, indices, weights, out_dtype)
    platform = jax.default_backend()
    if backend == "auto":
        backend = "pallas_tpu" if platform == "tpu" else "xla"
    if backend == "pallas":
        backend = "pallas_gpu" if platform == "gpu" else "pallas_tpu"
    if indices.shape[0] == 0:
        return jnp.zeros((0, table.shape[1]), out_dtype)
    # inside shard_map: operands typed alike, so each cotangent matches its operand and
    # a replicated table's gradient is summed over the shards (see shard_map_types)
    table, indices, weights = match_varying(table, indices, weights)
    ids = clamp_indices(indices, table.shape[0])
    if backend != "xla" and interpret is None:
        kernel_platform = {"pallas_tpu": "tpu", "pallas_gpu": "gpu"}[backend]
        interpret = platform != kernel_platform
    return embedding_bag_vjp(table, ids, weights, _impl(backend, out_dtype, bool(interpret)))
