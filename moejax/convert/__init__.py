"""Hugging Face checkpoint import/export for MoE families.

    model, cfg = moejax.convert.load_hf("path/to/hf_dir")     # config.json + safetensors
    moejax.convert.save_hf(model, cfg, "out_dir")             # transformers.from_pretrained reads it

Supported ``model_type``s: mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3;
plain or YaRN RoPE; float32/float16/bfloat16 and block-wise FP8 (DeepSeek-V3)
safetensors, single-file or sharded; experts per expert or fused 3-D.
Anything else, and any config option moejax cannot reproduce, raises
:class:`UnsupportedConfigError` naming it.

Command line: ``python -m moejax.convert --from-hf HF_DIR --out RUN`` (and
``--to-hf RUN --out HF_DIR``), see ``moejax/convert/__main__.py``.
"""

import importlib

from moejax.convert.checks import DamagedFileError, read_hf_config
from moejax.convert.families import EXPERT_LAYOUTS, FAMILIES
from moejax.convert.hf_config import UnsupportedConfigError

SUPPORTED_MODEL_TYPES = tuple(sorted(FAMILIES))

__all__ = ["DamagedFileError", "EXPERT_LAYOUTS", "SUPPORTED_MODEL_TYPES", "UnsupportedConfigError",
           "load_hf", "read_hf_config", "save_hf"]


def __getattr__(name: str):
    """load_hf / save_hf import jax on first use, so the command line checks its input first."""
    if name in ("load_hf", "save_hf"):
        value = getattr(importlib.import_module("moejax.convert.api"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'moejax.convert' has no attribute {name!r}")
