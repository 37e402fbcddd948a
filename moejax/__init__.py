"""moejax: Mixture-of-Experts and memory-layer language models in JAX."""

from moejax import sharding
from moejax.config import ConfigError, MemoryConfig, MLAConfig, MoEConfig, ModelConfig, YarnConfig
from moejax.model import Transformer
from moejax.moe import MoE

__all__ = ["ConfigError", "MemoryConfig", "MLAConfig", "MoEConfig", "ModelConfig", "MoE", "Transformer",
           "YarnConfig", "sharding"]
