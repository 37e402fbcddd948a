"""moejax: Mixture-of-Experts and memory-layer language models in JAX."""

from moejax import layers, memory, sharding
from moejax.config import ConfigError, MemoryConfig, MLAConfig, MoEConfig, ModelConfig, YarnConfig
from moejax.layers import LayerAux, LayerContext, register_ffn_kind
from moejax.model import Transformer
from moejax.moe import MoE

__all__ = ["ConfigError", "LayerAux", "LayerContext", "MemoryConfig", "MLAConfig", "MoEConfig",
           "ModelConfig", "MoE", "Transformer", "YarnConfig", "layers", "memory", "register_ffn_kind", "sharding"]
