"""Product-key memory (Lample et al. 2019; "Memory Layers at Scale", Berges et al. 2024).

T tokens, D model width, H heads, K query/key width (two halves of K/2),
n sub-keys per half, N = n * n value rows of width V, k rows read per head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from kernels_pallas import embedding_bag
from moejax.layers import LayerAux
from moejax import sharding, validate
from moejax.config import MemoryConfig

# Name of every memory value table parameter: train/optim.py gives these their own
# learning rate and no weight decay by matching it.
VALUES = "mem_values"


def topk_from_halves(s1_Xn: Float[Array, "... n"], s2_Xn: Float[Array, "... n"], k: int
                     ) -> tuple[Float[Array, "... k"], Int[Array, "... k"]]:
    """Exact top-k of ``s1[i1] + s2[i2]`` over all n * n pairs; index ``i1 * n + i2``.

    1. Top-k of each half: a pair in the overall top-k has both halves in their
       half's top-k (any half outside could be swapped for k better ones).
    2. Each half's k candidates are put in index order, so that the k * k sums,
       laid out row-major, run in order of the flat index ``i1 * n + i2``.
    3. Top-k over the k * k sums; ``lax.top_k`` breaks ties towards the lower
       position, i.e. the lower flat index, exactly as a top-k over all n * n
       slots does. Scores come out in descending order.
    Differentiable in the scores (gathers only).
    """
    n = s1_Xn.shape[-1]
    if s1_Xn.shape != s2_Xn.shape:
        raise ValueError(f"topk_from_halves: the halves' scores need one shape, got {s1_Xn.shape} "
                         f"and {s2_Xn.shape}")
    if validate.as_int(k) is None or not 1 <= k <= n:
        raise ValueError(f"topk_from_halves: k={k!r} must be an int in [1, n={n}]")
    v1_Xk, i1_Xk = _topk_in_index_order(s1_Xn, k)
    v2_Xk, i2_Xk = _topk_in_index_order(s2_Xn, k)
    lead = v1_Xk.shape[:-1]
    sums_Xkk = v1_Xk[..., :, None] + v2_Xk[..., None, :]
    scores_Xk, pos_Xk = jax.lax.top_k(sums_Xkk.reshape(*lead, k * k), k)
    rows_Xk = jnp.take_along_axis(i1_Xk, pos_Xk // k, axis=-1)
    cols_Xk = jnp.take_along_axis(i2_Xk, pos_Xk % k, axis=-1)
    return scores_Xk, rows_Xk * n + cols_Xk


def _topk_in_index_order(s_Xn, k):
    """Top-k of the last axis, listed in increasing index order.

    The reordering is a k x k comparison and a one-hot selection (rank of
    each index among the k), not an argsort: XLA:CPU sorts 32 elements about
    as slowly as it takes a top-k of 1024.
    """
    values_Xk, idx_Xk = jax.lax.top_k(s_Xn, k)  # ties: lower index first (the set is exact)
    rank_Xk = jnp.sum(idx_Xk[..., None, :] < idx_Xk[..., :, None], axis=-1)   # distinct indices
    slots = jnp.arange(k, dtype=rank_Xk.dtype)
    onehot_Xkk = rank_Xk[..., :, None] == slots.reshape((1,) * rank_Xk.ndim + (k,))   # [.., from, to]
    # from-slot of every to-slot (exact integer sums), then gathers: a gather keeps -0.0,
    # a summed selection would turn it into +0.0 (which top_k orders above -0.0)
    from_Xk = jnp.sum(jnp.where(onehot_Xkk, slots.reshape((1,) * (rank_Xk.ndim - 1) + (k, 1)), 0),
                      axis=-2)
    return (jnp.take_along_axis(values_Xk, from_Xk, axis=-1),
            jnp.take_along_axis(idx_Xk, from_Xk, axis=-1))


def product_key_topk(q_TK: Float[Array, "T K"], subkeys1_nK2: Float[Array, "n K2"],
                     subkeys2_nK2: Float[Array, "n K2"], k: int
                     ) -> tuple[Float[Array, "T k"], Int[Array, "T k"]]:
    """Single-head product-key retrieval: exact top-k over the n * n slots.

    Slot ``i1 * n + i2`` has key ``concat(subkeys1[i1], subkeys2[i2])``, so its
    score is ``q[:K/2] . subkeys1[i1] + q[K/2:] . subkeys2[i2]``. Returns the k
    best scores (descending; ties by lower index) and their slot indices.
    """
    num_keys, half = subkeys1_nK2.shape
    if q_TK.ndim != 2 or q_TK.shape[1] != 2 * half or subkeys2_nK2.shape != (num_keys, half):
        raise ValueError(f"product_key_topk: q [T, K] with subkeys [n, K/2] each; got q "
                         f"{q_TK.shape}, subkeys1 {subkeys1_nK2.shape}, subkeys2 {subkeys2_nK2.shape}")
    if validate.as_int(k) is None or not 1 <= k <= num_keys:
        raise ValueError(f"product_key_topk: k={k!r} must be an int in [1, n={num_keys}]")
    acc = jnp.promote_types(jnp.result_type(q_TK, subkeys1_nK2), jnp.float32)  # f32, or f64 under x64
    s1_Tn = jnp.einsum("tk,nk->tn", q_TK[:, :half], subkeys1_nK2, preferred_element_type=acc)
    s2_Tn = jnp.einsum("tk,nk->tn", q_TK[:, half:], subkeys2_nK2, preferred_element_type=acc)
    return topk_from_halves(s1_Tn, s2_Tn, k)


def _normal(rngs: nnx.Rngs, shape, stddev: float):
    return nnx.initializers.normal(stddev=stddev)(rngs.params(), shape, jnp.float32)


class MemoryValues(nnx.Module):
    """The [N, V] value table; one object may be handed to several ProductKeyMemory layers.

    Split along V over the mesh axes of the logical axis ``mem_values``: every
    device holds a slice of every row, so a lookup is local and only the
    per-token outputs are combined.
    """

    def __init__(self, num_slots: int, d_value: int, *, rngs: nnx.Rngs):
        self.mem_values = nnx.Param(_normal(rngs, (num_slots, d_value), d_value ** -0.5),
                                    logical_axes=(None, "mem_values"))


class ProductKeyMemory(nnx.Module):
    """Product-key memory layer with the Memory+ output (an FFN kind: 'pkm').

    1. Query per head: ``q = rmsnorm(x W_q)`` [T, H, K] (learned scale per head).
    2. Each half of q scores its head's n sub-keys; top-k per half.
    3. Exact top-k over the k x k candidate sums (``topk_from_halves``):
       scores [T, H, k], slot indices i1 * n + i2.
    4. Softmax over each head's k scores; ``m = sum over heads and rows of
       w * values[idx]`` with one ``kernels_pallas.embedding_bag`` over the
       H * k (row, weight) pairs of every token.
    5. Memory+ output: ``y = (m * silu(x W_g)) W_o``.
    ``values``: a MemoryValues to share with other layers (default: its own).
    """

    def __init__(self, cfg: MemoryConfig, d_model: int, *, rngs: nnx.Rngs,
                 values: MemoryValues | None = None, dtype=jnp.float32):
        self.cfg, self.dtype = cfg, dtype
        h, kd, n = cfg.num_heads, cfg.d_key, cfg.num_keys
        d_value = cfg.d_value or d_model
        self.values = values if values is not None else MemoryValues(cfg.num_slots, d_value, rngs=rngs)
        if self.values.mem_values.shape != (cfg.num_slots, d_value):
            raise ValueError(f"ProductKeyMemory: shared values have shape {self.values.mem_values.shape}, "
                             f"the config needs {(cfg.num_slots, d_value)}")
        self.w_q = nnx.Param(_normal(rngs, (d_model, h, kd), d_model ** -0.5),
                             logical_axes=("embed", None, None))
        self.q_scale = nnx.Param(jnp.ones((h, kd), jnp.float32), logical_axes=(None, None))
        # [H, 2, n, K/2]; unit-variance half scores for a unit-rms query
        self.subkeys = nnx.Param(_normal(rngs, (h, 2, n, kd // 2), (kd // 2) ** -0.5),
                                 logical_axes=(None, None, None, None))
        self.w_gate = nnx.Param(_normal(rngs, (d_model, d_value), d_model ** -0.5),
                                logical_axes=("embed", "mem_values"))
        self.w_out = nnx.Param(_normal(rngs, (d_value, d_model), d_value ** -0.5),
                               logical_axes=("mem_values", "embed"))

    def retrieve(self, x_TD: Float[Array, "T D"]) -> tuple[Float[Array, "T H k"], Int[Array, "T H k"]]:
        """Steps 1-3: (scores, slot indices) per head."""
        cfg, half = self.cfg, self.cfg.d_key // 2
        q_THK = jnp.einsum("td,dhk->thk", x_TD.astype(self.dtype), self.w_q[...].astype(self.dtype),
                           preferred_element_type=jnp.float32)
        q_THK = q_THK * jax.lax.rsqrt(jnp.mean(jnp.square(q_THK), axis=-1, keepdims=True) + 1e-6)
        q_THK = q_THK * self.q_scale[...][None]
        keys = self.subkeys[...]
        s1_THn = jnp.einsum("thk,hnk->thn", q_THK[..., :half], keys[:, 0])
        s2_THn = jnp.einsum("thk,hnk->thn", q_THK[..., half:], keys[:, 1])
        return topk_from_halves(s1_THn, s2_THn, cfg.top_k)

    def __call__(self, x_BSD: Float[Array, "B S D"], ctx=None):
        """FFN-kind call -> (y [B, S, D], LayerAux()); needs nothing from ``ctx`` (no decode state)."""
        return self.read(x_BSD), LayerAux()

    def read(self, x_BSD: Float[Array, "B S D"]) -> Float[Array, "B S D"]:
        """Steps 1-5 on a [B, S, D] input."""
        batch, seq, d_model = x_BSD.shape
        x_TD = x_BSD.reshape(batch * seq, d_model)
        scores_THk, idx_THk = self.retrieve(x_TD)
        w_THk = jax.nn.softmax(scores_THk, axis=-1)
        hk = w_THk.shape[1] * w_THk.shape[2]
        mem_TV = embedding_bag(self.values.mem_values[...], idx_THk.reshape(-1, hk),
                               w_THk.reshape(-1, hk), preferred_element_type=jnp.float32)
        # Pin the bag output (and so its cotangent) to tokens x value slices. Left to
        # the partitioner, a mesh whose batch and value splits share an axis (the default
        # rules with data or fsdp, expert and tensor > 1) got the weights' gradient wrong
        # (XLA's Shardy propagation, jax 0.10.2): d_query off by 100%, outputs right.
        mem_TV = sharding.constrain(mem_TV, ("batch", "mem_values"))
        dt = self.dtype
        gate_TV = jax.nn.silu(jnp.einsum("td,dv->tv", x_TD.astype(dt), self.w_gate[...].astype(dt),
                                         preferred_element_type=jnp.float32))
        y_TD = jnp.einsum("tv,vd->td", (mem_TV * gate_TV).astype(dt), self.w_out[...].astype(dt),
                          preferred_element_type=jnp.float32)
        return y_TD.reshape(batch, seq, d_model).astype(x_BSD.dtype)
