"""moejax: Mixture-of-Experts and memory-layer language models in JAX.

The names below load on first use (PEP 562), so ``import moejax.config``
(pure Python) does not pay for importing jax and flax: command lines validate
their flags and paths before the heavy imports, and ``import moejax`` does not
need the optional 'convert' extra (safetensors) until ``moejax.convert`` is used.
"""

import importlib

# every module a user reaches as ``moejax.<module>.<name>`` after a plain ``import moejax``
_SUBMODULES = ("attend", "attention", "checkpoint", "config", "convert", "dispatch", "expert_parallel",
               "experts", "layers", "memory", "model", "moe", "routing", "sharding", "validate")
_EXPORTS = {
    "ConfigError": "moejax.config", "MemoryConfig": "moejax.config", "MLAConfig": "moejax.config",
    "MoEConfig": "moejax.config", "ModelConfig": "moejax.config", "YarnConfig": "moejax.config",
    "quantize_experts": "moejax.experts", "LayerAux": "moejax.layers", "LayerContext": "moejax.layers",
    "register_ffn_kind": "moejax.layers", "Transformer": "moejax.model", "MoE": "moejax.moe",
}

__all__ = sorted([*_EXPORTS, "experts", "layers", "memory", "sharding"])


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"moejax.{name}")
    if name not in _EXPORTS:
        raise AttributeError(f"module 'moejax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))
