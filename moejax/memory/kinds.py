"""The memory layers as FFN kinds of the model (``ModelConfig.ffn_kinds``).

'pkm' (product-key memory) and 'engram' (hashed n-gram memory) replace a
layer's FFN; 'pkm+dense', 'pkm+moe', 'engram+dense', 'engram+moe' run the
memory beside that FFN and add the two outputs (Engram sits beside the MoE
in DeepSeek's models). All need ``ModelConfig.memory``.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from moejax.config import ConfigError
from moejax.layers import FFN_KINDS, LayerAux, register_ffn_kind, shared_in_model
from moejax.memory.ngram import NGramMemory
from moejax.memory.product_key import MemoryValues, ProductKeyMemory

def build_pkm(cfg, layer: int, *, rngs: nnx.Rngs) -> ProductKeyMemory:
    mem = cfg.memory
    values = None
    if mem.share_values and cfg.scan_layers:
        raise ConfigError("MemoryConfig.share_values: one table for several layers needs "
                          "ModelConfig.scan_layers=False (scanned layers stack their variables)")
    if mem.share_values:   # one table per model (not per Rngs: two models built from one must not share)
        values = shared_in_model("pkm_values", lambda: MemoryValues(mem.num_slots, mem.d_value or cfg.d_model,
                                                                    rngs=rngs))
    return ProductKeyMemory(mem, cfg.d_model, rngs=rngs, values=values, dtype=jnp.dtype(cfg.dtype))


def build_engram(cfg, layer: int, *, rngs: nnx.Rngs) -> NGramMemory:
    return NGramMemory(cfg.memory, cfg.d_model, rngs=rngs, vocab_size=cfg.vocab_size,
                       dtype=jnp.dtype(cfg.dtype))


class MemoryBeside(nnx.Module):
    """A memory layer next to another FFN kind: ``y = memory(x) + ffn(x)``; the FFN's aux.

    The decode hooks (``token_lookback``, ``init_state``) are the memory's.
    """

    def __init__(self, memory: nnx.Module, ffn: nnx.Module):
        self.memory, self.ffn = memory, ffn
        self.token_lookback = getattr(memory, "token_lookback", 0)

    def init_state(self, batch_size: int, max_len: int):
        init = getattr(self.memory, "init_state", None)
        return None if init is None else init(batch_size, max_len)

    def __call__(self, x_BSD, ctx) -> tuple[jnp.ndarray, LayerAux]:
        y_mem_BSD, _ = self.memory(x_BSD, ctx)
        y_ffn_BSD, aux = self.ffn(x_BSD, ctx)
        return y_mem_BSD + y_ffn_BSD.astype(y_mem_BSD.dtype), aux


def _beside(build_memory, inner: str):
    def build(cfg, layer: int, *, rngs: nnx.Rngs) -> MemoryBeside:
        return MemoryBeside(build_memory(cfg, layer, rngs=rngs), FFN_KINDS[inner].build(cfg, layer, rngs=rngs))
    return build


register_ffn_kind("pkm", build_pkm, needs=("memory",))
register_ffn_kind("engram", build_engram, needs=("memory",))
for _memory_kind, _build in (("pkm", build_pkm), ("engram", build_engram)):
    register_ffn_kind(f"{_memory_kind}+dense", _beside(_build, "dense"), needs=("memory",))
    register_ffn_kind(f"{_memory_kind}+moe", _beside(_build, "moe"), needs=("memory", "moe"))
