"""The FFN protocol: layer context, the registry of FFN kinds, and the typed aux output.

Every FFN kind is an ``nnx.Module`` called as ``y_BSD, aux = ffn(x_BSD, ctx)``
with ``aux`` a :class:`LayerAux`. ``ModelConfig.ffn_kinds`` names one kind per
layer; ``Block`` builds it with :func:`build_ffn` and calls it without knowing
which kind it is. A new kind plugs in with :func:`register_ffn_kind`.

Optional class-level hooks a kind may define (the model reads them with
``getattr`` defaults): ``token_lookback: int = 0`` (how many previous token ids
it needs in ``ctx.prev_tokens_BN``) and ``init_state(batch_size, max_len)``
(its decode state; default None). A row whose chunk starts at position 0 has no
history: a kind must then ignore the state it is handed for that row (serving
reuses a cache row for a new request by setting its length to 0, nothing else).
A builder that shares one object between the layers of a model (a memory value
table) gets it from :func:`shared_in_model`, scoped to one model's construction
by :func:`model_build`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Int

if TYPE_CHECKING:
    from moejax.config import ModelConfig


@dataclasses.dataclass
class LayerContext:
    """What one layer call knows beyond its hidden state (built by the model per call)."""

    tokens_BS: Int[Array, "B S"]                       # token ids of this chunk
    positions_BS: Int[Array, "B S"]                    # absolute positions
    valid_BS: Bool[Array, "B S"] | None = None         # False on padding; None = all valid
    prev_tokens_BN: Int[Array, "B N"] | None = None    # the N ids before this chunk, -1 where none
    state: Any = None        # this layer's FFN decode state going in; None outside decoding
    new_state: Any = None    # a stateful FFN kind sets its updated decode state here


# --------------------------------------------------------------------------- aux

SUM, MEAN, STACK = "sum", "mean", "stack"


def _field(reduce: str):
    return dataclasses.field(default=None, metadata={"reduce": reduce})


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerAux:
    """Side outputs of one FFN layer, and (after :meth:`reduce`) of the whole model.

    A layer leaves a field None when it has nothing to report (a dense FFN
    reports nothing). Each field's metadata says how the model reduces it over
    the layers that report it: 'sum', 'mean', or 'stack' (a new leading layer
    axis). After the reduction every field is an array (zeros when no layer
    reported it; 'expert_load' is then [0, 0]).
    Dict-style reads work too: ``aux["expert_load"]``, ``aux.items()``.
    """

    aux_loss: Array | None = _field(SUM)            # load-balance loss (unweighted)
    z_loss: Array | None = _field(SUM)              # router z-loss (unweighted)
    router_loss: Array | None = _field(SUM)         # the two weighted by their coefficients
    dropped_fraction: Array | None = _field(MEAN)   # (token, slot) pairs dropped, mean over MoE layers
    expert_load: Array | None = _field(STACK)       # [E] per layer -> [num_moe_layers, E]
    ep_overflow: Array | None = _field(SUM)         # pairs dropped by full expert-parallel buffers
    dispatch_bytes: Array | None = _field(SUM)      # bytes the forward exchange moved across devices
    dispatch_min_bytes: Array | None = _field(SUM)  # the least any exchange must move

    # dict-style access, so code written against the old aux dict keeps working
    def __getitem__(self, key: str) -> Array:
        if key not in self._names():
            raise KeyError(key)
        value = getattr(self, key)
        if value is None:
            raise KeyError(f"{key!r} was not reported")
        return value

    def __contains__(self, key: object) -> bool:
        return key in self._names() and getattr(self, key) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def keys(self) -> list[str]:
        return [name for name in self._names() if getattr(self, name) is not None]

    def items(self) -> list[tuple[str, Array]]:
        return [(name, getattr(self, name)) for name in self.keys()]

    def get(self, key: str, default=None):
        return self[key] if key in self else default

    def replace(self, **changes: Any) -> "LayerAux":
        return dataclasses.replace(self, **changes)

    def merged(self, other: "LayerAux") -> "LayerAux":
        """Fields reported by ``other`` override this one's (router aux + dispatch stats)."""
        return self.replace(**dict(other.items()))

    @classmethod
    def _names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def reduce(cls, layers: list["LayerAux"]) -> "LayerAux":
        """Model-level aux from the layers' (in layer order), each field by its reduction."""
        zero = jnp.zeros((), jnp.float32)
        out = {}
        for f in dataclasses.fields(cls):
            values = [getattr(a, f.name) for a in layers if getattr(a, f.name) is not None]
            how = f.metadata["reduce"]
            if how == STACK:
                out[f.name] = jnp.stack(values) if values else jnp.zeros((0, 0), jnp.float32)
            elif not values:
                out[f.name] = zero
            elif how == SUM:
                out[f.name] = sum(values[1:], values[0])
            else:
                out[f.name] = sum(values[1:], values[0]) / len(values)
        return cls(**out)


# ---------------------------------------------------------------------- registry

@dataclasses.dataclass(frozen=True)
class FFNKind:
    """How to build one FFN kind: ``build(cfg, layer, *, rngs) -> module``; ``needs`` names
    the ModelConfig fields that must be set for it (checked by ModelConfig)."""

    build: Callable[..., nnx.Module]
    needs: tuple[str, ...] = ()


FFN_KINDS: dict[str, FFNKind] = {}


def register_ffn_kind(name: str, build: Callable[..., nnx.Module], *,
                      needs: tuple[str, ...] = ()) -> None:
    """Make ``name`` usable in ``ModelConfig.ffn_kinds``; ``build(cfg, layer, *, rngs)``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"FFN kind name must be a non-empty str, got {name!r}")
    if name in FFN_KINDS and FFN_KINDS[name].build is not build:
        raise ValueError(f"FFN kind {name!r} is already registered")
    FFN_KINDS[name] = FFNKind(build, tuple(needs))


def build_ffn(cfg: "ModelConfig", layer: int, *, rngs: nnx.Rngs) -> nnx.Module:
    """The FFN module of layer ``layer`` (kind ``cfg.ffn_kinds[layer]``)."""
    return FFN_KINDS[cfg.ffn_kinds[layer]].build(cfg, layer, rngs=rngs)


_MODEL_BUILD: contextvars.ContextVar[dict | None] = contextvars.ContextVar("moejax_model_build",
                                                                         default=None)


@contextlib.contextmanager
def model_build():
    """The construction of one model's layers: what they share (:func:`shared_in_model`)
    is made once inside it and never reaches another model."""
    token = _MODEL_BUILD.set({})
    try:
        yield
    finally:
        _MODEL_BUILD.reset(token)


def shared_in_model(key: Any, make: Callable[[], Any]) -> Any:
    """The object ``key`` of the model being built: ``make()`` for the first layer that asks,
    the same object for the others. Outside :func:`model_build` (a layer built on its own)
    every call makes a new one."""
    scope = _MODEL_BUILD.get()
    if scope is None:
        return make()
    if key not in scope:
        scope[key] = make()
    return scope[key]


def _build_dense(cfg: "ModelConfig", layer: int, *, rngs: nnx.Rngs) -> nnx.Module:
    from moejax.moe import DenseFFN  # moe.py imports this module: import at build time
    return DenseFFN(cfg.d_model, cfg.d_ff, rngs=rngs, dtype=jnp.dtype(cfg.dtype))


def _build_moe(cfg: "ModelConfig", layer: int, *, rngs: nnx.Rngs) -> nnx.Module:
    from moejax.moe import MoE
    return MoE(cfg.moe, rngs=rngs)


register_ffn_kind("dense", _build_dense)
register_ffn_kind("moe", _build_moe, needs=("moe",))
