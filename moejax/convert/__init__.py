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

from moejax.convert.api import EXPERT_LAYOUTS, load_hf, read_hf_config, save_hf
from moejax.convert.families import FAMILIES
from moejax.convert.hf_config import UnsupportedConfigError

SUPPORTED_MODEL_TYPES = tuple(sorted(FAMILIES))

__all__ = ["EXPERT_LAYOUTS", "SUPPORTED_MODEL_TYPES", "UnsupportedConfigError", "load_hf",
           "read_hf_config", "save_hf"]
