"""moejax: Mixture-of-Experts and memory-layer language models in JAX.

The names below load on first use (PEP 562), so ``import moejax.config``
(pure Python) does not pay for importing jax and flax: command lines validate
their flags and paths before the heavy imports.
"""

import importlib

_EXPORTS = {
    "ConfigError": "moejax.config", "MemoryConfig": "moejax.config", "MLAConfig": "moejax.config",
    "MoEConfig": "moejax.config", "ModelConfig": "moejax.config", "YarnConfig": "moejax.config",
    "Transformer": "moejax.model", "MoE": "moejax.moe", "sharding": None,
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'moejax' has no attribute {name!r}")
    module = _EXPORTS[name]
    value = (importlib.import_module(f"moejax.{name}") if module is None
             else getattr(importlib.import_module(module), name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
