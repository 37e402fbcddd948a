"""moejax: Mixture-of-Experts and memory-layer language models in JAX."""

import importlib

from moejax import experts, layers, memory, sharding
from moejax.config import ConfigError, MemoryConfig, MLAConfig, MoEConfig, ModelConfig, YarnConfig
from moejax.experts import quantize_experts
from moejax.layers import LayerAux, LayerContext, register_ffn_kind
from moejax.model import Transformer
from moejax.moe import MoE

__all__ = ["ConfigError", "LayerAux", "LayerContext", "MemoryConfig", "MLAConfig", "MoEConfig",
           "ModelConfig", "MoE", "Transformer", "YarnConfig", "experts", "layers", "memory",
           "quantize_experts", "register_ffn_kind", "sharding"]

# Imported on first use (``moejax.convert.load_hf(...)`` after a plain ``import moejax``),
# so that ``import moejax`` does not need the optional 'convert' extra (safetensors).
_LAZY_SUBMODULES = ("convert", "checkpoint")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"moejax.{name}")
    raise AttributeError(f"module 'moejax' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY_SUBMODULES])

