"""Routed experts as objects: each owns its weights and its compute.

Shapes: M expert-sorted rows, T tokens, E experts, C rows per expert buffer,
D model width, F expert hidden width.

Two layers of objects:

- nnx modules that own the variables: :class:`RoutedExperts` (float, trained)
  and :class:`Int8Experts` (weight-only int8, per-output-channel scales;
  frozen, for serving). ``experts.weights()`` returns a weights view.
- weights views (:class:`FloatExpertWeights`, :class:`Int8ExpertWeights`):
  pytrees of the arrays in compute form, so they cross ``jit`` and
  ``shard_map`` like any argument. Every view computes the same SwiGLU experts
  three ways, one per dispatch shape:

  ``view(x_MD, group_sizes_E, backend=) -> y_MD``  expert-sorted rows (grouped matmul)
  ``view.dense(x_TD) -> y_TED``                      every expert on every token
  ``view.batched(x_ECD) -> y_ECD``                   fixed per-expert buffers

  ``view.leaf_axes()`` gives each leaf's logical axes (in ``jax.tree.leaves``
  order): expert parallelism shards, gathers and slices the leaves by these,
  without knowing which kind of expert it runs. The 'mlp' dim is the only one
  whose split makes the output a partial sum (tensor parallelism).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

import kernels_pallas
from kernels_pallas.gmm import gmm_int8

IN_AXES = ("expert", "embed", "mlp")    # w_gate / w_up [E, D, F]
OUT_AXES = ("expert", "mlp", "embed")   # w_down [E, F, D]


def swiglu(gate, up):
    return jax.nn.silu(gate) * up


def _normal(rngs: nnx.Rngs, shape, fan_in: int):
    return nnx.initializers.normal(stddev=fan_in ** -0.5)(rngs.params(), shape, jnp.float32)


def _view(cls):
    """Register a frozen dataclass as a pytree: array fields are leaves, 'dtype' is static."""
    fields = [f.name for f in dataclasses.fields(cls)]
    return jax.tree_util.register_dataclass(
        cls, data_fields=[f for f in fields if f != "dtype"],
        meta_fields=[f for f in fields if f == "dtype"])


class _SwiGLUWeights:
    """What both views share: shape facts and the leaf axes; subclasses say how each
    projection is computed (``_mm`` grouped, ``_dequantized`` for the einsum paths)."""

    AXES: ClassVar[dict[str, tuple[str, ...]]]

    def leaf_axes(self) -> tuple[tuple[str, ...], ...]:
        return tuple(self.AXES[f.name] for f in dataclasses.fields(self) if f.name in self.AXES)

    def dense(self, x_TD: Float[Array, "T D"]) -> Float[Array, "T E D"]:
        w_gate_EDF, w_up_EDF, w_down_EFD = self._dequantized()
        h_TEF = swiglu(jnp.einsum("td,edf->tef", x_TD, w_gate_EDF),
                       jnp.einsum("td,edf->tef", x_TD, w_up_EDF))
        return jnp.einsum("tef,efd->ted", h_TEF, w_down_EFD)

    def batched(self, x_ECD: Float[Array, "E C D"]) -> Float[Array, "E C D"]:
        w_gate_EDF, w_up_EDF, w_down_EFD = self._dequantized()
        h_ECF = swiglu(jnp.einsum("ecd,edf->ecf", x_ECD, w_gate_EDF),
                       jnp.einsum("ecd,edf->ecf", x_ECD, w_up_EDF))
        return jnp.einsum("ecf,efd->ecd", h_ECF, w_down_EFD)

    def __call__(self, x_MD: Float[Array, "M D"], group_sizes_E: Int[Array, "E"], *,
                 backend: str = "auto") -> Float[Array, "M D"]:
        """SwiGLU experts on expert-sorted rows (group e = the next group_sizes_E[e] rows)."""
        h_MF = swiglu(self._mm(x_MD, "gate", group_sizes_E, backend),
                      self._mm(x_MD, "up", group_sizes_E, backend))
        return self._mm(h_MF, "down", group_sizes_E, backend)


@_view
@dataclasses.dataclass(frozen=True)
class FloatExpertWeights(_SwiGLUWeights):
    """Float experts in the compute dtype: w_gate/w_up [E, D, F], w_down [E, F, D]."""

    w_gate_EDF: Array
    w_up_EDF: Array
    w_down_EFD: Array
    AXES: ClassVar = {"w_gate_EDF": IN_AXES, "w_up_EDF": IN_AXES, "w_down_EFD": OUT_AXES}

    @property
    def num_experts(self) -> int:
        return self.w_gate_EDF.shape[0]

    def _dequantized(self):
        return self.w_gate_EDF, self.w_up_EDF, self.w_down_EFD

    def _mm(self, x_MK, which: str, group_sizes_E, backend: str):
        w_EKN = {"gate": self.w_gate_EDF, "up": self.w_up_EDF, "down": self.w_down_EFD}[which]
        return kernels_pallas.gmm(x_MK, w_EKN, group_sizes_E, backend=backend)


@_view
@dataclasses.dataclass(frozen=True)
class Int8ExpertWeights(_SwiGLUWeights):
    """Weight-only int8 experts: ``w[e, k, n] ~= q[e, k, n] * scale[e, n]`` (per output
    channel), activations in ``dtype``. The grouped path runs ``gmm_int8`` (the kernel
    dequantizes tiles on chip); the dense/buffer paths dequantize up front."""

    q_gate_EDF: Array
    s_gate_EF: Array
    q_up_EDF: Array
    s_up_EF: Array
    q_down_EFD: Array
    s_down_ED: Array
    dtype: str = "float32"
    AXES: ClassVar = {"q_gate_EDF": IN_AXES, "s_gate_EF": ("expert", "mlp"),
                      "q_up_EDF": IN_AXES, "s_up_EF": ("expert", "mlp"),
                      "q_down_EFD": OUT_AXES, "s_down_ED": ("expert", "embed")}

    @property
    def num_experts(self) -> int:
        return self.q_gate_EDF.shape[0]

    def _pairs(self):
        return {"gate": (self.q_gate_EDF, self.s_gate_EF), "up": (self.q_up_EDF, self.s_up_EF),
                "down": (self.q_down_EFD, self.s_down_ED)}

    def _dequantized(self):
        return tuple(dequantize(q, s).astype(self.dtype) for q, s in self._pairs().values())

    def _mm(self, x_MK, which: str, group_sizes_E, backend: str):
        q_EKN, s_EN = self._pairs()[which]
        return gmm_int8(x_MK.astype(self.dtype), q_EKN, s_EN, group_sizes_E, backend=backend)


def quantize(w_EKN: Float[Array, "E K N"]) -> tuple[Array, Array]:
    """Symmetric int8 per output channel: scale[e, n] = max_k |w[e, k, n]| / 127 and
    q = round(w / scale) in [-127, 127] (|w - q*scale| <= scale/2). All-zero channels
    get scale 1 (q = 0 there)."""
    w_EKN = w_EKN.astype(jnp.float32)
    scale_EN = jnp.max(jnp.abs(w_EKN), axis=1) / 127.0
    scale_EN = jnp.where(scale_EN > 0, scale_EN, 1.0)
    q_EKN = jnp.clip(jnp.round(w_EKN / scale_EN[:, None, :]), -127, 127).astype(jnp.int8)
    return q_EKN, scale_EN


def dequantize(q_EKN: Array, scale_EN: Array) -> Float[Array, "E K N"]:
    return q_EKN.astype(jnp.float32) * scale_EN[:, None, :].astype(jnp.float32)


class _ExpertsModule(nnx.Module):
    """Module side of the protocol: the views do the work."""

    def __call__(self, x_MD, group_sizes_E, *, backend: str = "auto"):
        return self.weights()(x_MD.astype(self.dtype), group_sizes_E, backend=backend)

    def dense(self, x_TD):
        return self.weights().dense(x_TD.astype(self.dtype))

    def batched(self, x_ECD):
        return self.weights().batched(x_ECD.astype(self.dtype))


class RoutedExperts(_ExpertsModule):
    """E SwiGLU experts stored stacked (float32 master weights): w_gate/w_up [E, D, F],
    w_down [E, F, D]; computed in ``cfg.dtype``."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        e, d, f = cfg.num_experts, cfg.d_model, cfg.d_ff
        self.dtype = jnp.dtype(cfg.dtype)
        self.num_experts, self.d_model, self.d_ff = e, d, f
        self.w_gate = nnx.Param(_normal(rngs, (e, d, f), d), logical_axes=IN_AXES)
        self.w_up = nnx.Param(_normal(rngs, (e, d, f), d), logical_axes=IN_AXES)
        self.w_down = nnx.Param(_normal(rngs, (e, f, d), f), logical_axes=OUT_AXES)

    VARIABLES: ClassVar = ("w_gate", "w_up", "w_down")

    @staticmethod
    def view(arrays, dtype) -> FloatExpertWeights:
        """The weights view of these experts' arrays by variable name, computed in ``dtype``."""
        return FloatExpertWeights(*(arrays[n].astype(dtype) for n in RoutedExperts.VARIABLES))

    def weights(self) -> FloatExpertWeights:
        return self.view({n: getattr(self, n)[...] for n in self.VARIABLES}, self.dtype)


class Int8Weight(nnx.Variable):
    """A frozen quantized weight or its scales: not an nnx.Param, so optimizers and
    ``nnx.split(model, nnx.Param, ...)`` leave it alone."""


class Int8Experts(_ExpertsModule):
    """Weight-only int8 routed experts (per-output-channel scales) for serving;
    built from float experts by :meth:`from_float` (see ``moejax.quantize_experts``)."""

    def __init__(self, q_and_scales: dict[str, tuple[Array, Array]], dtype):
        self.dtype = jnp.dtype(dtype)
        (q_gate, s_gate), (q_up, s_up), (q_down, s_down) = (
            q_and_scales[k] for k in ("gate", "up", "down"))
        self.num_experts, self.d_model, self.d_ff = q_gate.shape
        axes = Int8ExpertWeights.AXES
        self.q_gate = Int8Weight(q_gate, logical_axes=axes["q_gate_EDF"])
        self.s_gate = Int8Weight(s_gate, logical_axes=axes["s_gate_EF"])
        self.q_up = Int8Weight(q_up, logical_axes=axes["q_up_EDF"])
        self.s_up = Int8Weight(s_up, logical_axes=axes["s_up_EF"])
        self.q_down = Int8Weight(q_down, logical_axes=axes["q_down_EFD"])
        self.s_down = Int8Weight(s_down, logical_axes=axes["s_down_ED"])

    @classmethod
    def from_float(cls, experts: RoutedExperts) -> "Int8Experts":
        return cls({k: quantize(w[...]) for k, w in (("gate", experts.w_gate), ("up", experts.w_up),
                                                      ("down", experts.w_down))}, experts.dtype)

    VARIABLES: ClassVar = ("q_gate", "s_gate", "q_up", "s_up", "q_down", "s_down")

    @staticmethod
    def view(arrays, dtype) -> Int8ExpertWeights:
        """The weights view of these experts' arrays by variable name, computed in ``dtype``."""
        return Int8ExpertWeights(*(arrays[n] for n in Int8Experts.VARIABLES),
                                 dtype=jnp.dtype(dtype).name)

    def weights(self) -> Int8ExpertWeights:
        return self.view({n: getattr(self, n)[...] for n in self.VARIABLES}, self.dtype)


def view_of(arrays, dtype) -> FloatExpertWeights | Int8ExpertWeights:
    """The weights view of one experts module's arrays given by variable name (a serving
    checkpoint's expert tensors, an expert slot pool), whichever kind of experts they are."""
    for kind in (RoutedExperts, Int8Experts):
        if set(arrays) == set(kind.VARIABLES):
            return kind.view(arrays, dtype)
    raise ValueError(f"expert tensors {sorted(arrays)} are neither float experts "
                     f"{list(RoutedExperts.VARIABLES)} nor int8 experts {list(Int8Experts.VARIABLES)}")


def quantize_experts(model: nnx.Module) -> nnx.Module:
    """Replace the float routed experts of every MoE layer in ``model`` (a Transformer,
    an MoE, or any module holding them) by int8 experts; in place, returns ``model``."""
    from moejax.moe import MoE  # moe.py imports this module

    from moejax.layer_stack import STACK_METADATA, is_stacked

    layers = [node for _, node in nnx.iter_graph(model) if isinstance(node, MoE)]
    for moe in layers:
        if isinstance(moe.experts, RoutedExperts):
            if is_stacked(moe.experts.w_gate):   # scanned layers: quantize each layer's experts
                moe.experts = nnx.vmap(Int8Experts.from_float, in_axes=0, out_axes=0,
                                       transform_metadata=STACK_METADATA)(moe.experts)
            else:
                moe.experts = Int8Experts.from_float(moe.experts)
    return model
