"""Reading Hugging Face ``config.json`` dicts strictly: every key is either
used, known to be inert (metadata, training-only switches at their neutral
value), or rejected with a message that names it. Nothing is ignored silently.
"""

from __future__ import annotations

import math
from typing import Any

from moejax.config import YarnConfig


class UnsupportedConfigError(ValueError):
    """A Hugging Face config names an architecture or option moejax cannot reproduce."""


# Keys that never change the forward pass: bookkeeping, tokens, generation,
# initialisation, caching, and transformers' own serialisation fields.
INERT_KEYS = frozenset({
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype",
    "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "use_cache",
    "output_router_logits", "auto_map", "_name_or_path", "name_or_path", "tokenizer_class",
    "return_dict", "output_hidden_states", "output_attentions", "use_bfloat16",
    "max_position_embeddings", "_attn_implementation_autoset", "chunk_size_feed_forward",
    "is_encoder_decoder", "tie_encoder_decoder", "pretraining_tp", "ep_size",
    "router_aux_loss_coef", "aux_loss_alpha", "seq_aux", "bias_update_speed",
})


class HFConfig:
    """A ``config.json`` dict that records which keys the converter consumed."""

    def __init__(self, data: dict[str, Any]):
        self.data = dict(data)
        self.model_type = data.get("model_type", "<missing>")
        self.used: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.used.add(key)
        value = self.data.get(key, default)
        return default if value is None and default is not None else value

    def flag(self, key: str, default: bool) -> bool:
        """A JSON true/false (absent or null: ``default``); anything else is refused, since
        ``bool()`` would read the string "false" as True."""
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise UnsupportedConfigError(f"{self.model_type} config.json: {key}={value!r} must be "
                                         "true or false")
        return value

    def mapping(self, key: str) -> dict[str, Any]:
        """A JSON object (absent or null: {}); anything else is refused by name."""
        value = self.get(key) or {}
        if not isinstance(value, dict):
            raise UnsupportedConfigError(f"{self.model_type} config.json: {key}={value!r} must be "
                                         "an object (or null)")
        return value

    def written(self, key: str, absent: Any) -> Any:
        """The value of ``key`` as written, null included; ``absent`` when config.json leaves the
        key out (for keys whose null means something other than the default)."""
        self.used.add(key)
        return self.data[key] if key in self.data else absent

    def require(self, key: str) -> Any:
        self.used.add(key)
        if self.data.get(key) is None:
            raise UnsupportedConfigError(f"{self.model_type} config.json: missing required key {key!r}")
        return self.data[key]

    def expect(self, key: str, allowed: tuple, why: str) -> Any:
        """The value of ``key`` (absent counts as the first allowed value); others are rejected."""
        self.used.add(key)
        value = self.data.get(key, allowed[0])
        if value not in allowed:
            raise UnsupportedConfigError(
                f"{self.model_type} config.json: {key}={value!r} is not supported ({why}); "
                f"supported: {', '.join(repr(a) for a in allowed)}")
        return value

    def check_all_used(self) -> None:
        unknown = sorted(set(self.data) - self.used - INERT_KEYS)
        if unknown:
            raise UnsupportedConfigError(
                f"{self.model_type} config.json: option(s) {', '.join(unknown)} are not understood "
                f"by moejax.convert; refusing to convert rather than ignore them")


def read_fp8_block(hf: HFConfig) -> tuple[int, int] | None:
    """Block size of block-wise FP8 weights (DeepSeek-V3's ``quantization_config``), or None.

    Such checkpoints store ``W`` as float8 with a float32 ``W_scale_inv`` per
    [block_out, block_in] tile; the loader dequantizes them to float32, which
    represents the stored weights exactly. Other quantization methods are
    rejected by name.
    """
    quant = hf.mapping("quantization_config")
    if not quant:
        return None
    method, block = quant.get("quant_method"), quant.get("weight_block_size")
    if method != "fp8" or not (isinstance(block, list) and len(block) == 2):
        raise UnsupportedConfigError(
            f"{hf.model_type} config.json: quantization_config quant_method={method!r} "
            f"weight_block_size={block!r} is not supported (only block-wise 'fp8' weights)")
    return int(block[0]), int(block[1])


def read_common(hf: HFConfig, *, max_positions: int, n_kv_heads: int | None = None,
                rope_theta: float = 10000.0, rms_norm_eps: float = 1e-6) -> dict[str, Any]:
    """Fields every supported family shares -> ModelConfig keyword arguments.

    ``max_positions`` / ``n_kv_heads`` / ``rope_theta`` / ``rms_norm_eps`` are
    the family's transformers defaults, used when config.json leaves the key
    out (``n_kv_heads`` None: one per attention head).
    """
    hf.expect("hidden_act", ("silu",), "experts and dense FFNs are SwiGLU")
    hf.expect("attention_dropout", (0.0, 0), "moejax attention has no dropout")
    n_heads = hf.require("num_attention_heads")
    max_positions = hf.get("max_position_embeddings", max_positions)
    theta, yarn, _ = read_rope(hf, max_positions, rope_theta)
    return dict(
        vocab_size=hf.require("vocab_size"),
        d_model=hf.require("hidden_size"),
        n_layers=hf.require("num_hidden_layers"),
        n_heads=n_heads,
        # absent: the family's default; null: one per head (0 is refused by ModelConfig, not defaulted)
        n_kv_heads=_or(hf.written("num_key_value_heads", n_kv_heads), n_heads),
        rope_theta=theta,
        rope_yarn=yarn,
        rms_norm_eps=float(hf.get("rms_norm_eps", rms_norm_eps)),
        tie_embeddings=hf.get("tie_word_embeddings", False),   # ModelConfig checks the types
        max_seq_len=max_positions,
    )


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


YARN_KEYS = frozenset({"factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
                       "attention_factor", "mscale", "mscale_all_dim", "truncate"})


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1 * mscale * ln(factor) + 1 (1 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def read_rope(hf: HFConfig, max_positions: int, default_theta: float = 10000.0
              ) -> tuple[float, YarnConfig | None, float]:
    """(rope_theta, YaRN config or None, DeepSeek softmax mscale) from config.json.

    ``max_positions`` is the model's max_position_embeddings (YaRN without a
    ``factor`` scales by its ratio to original_max_position_embeddings).

    transformers 5 writes ``rope_parameters``; 4.x writes ``rope_theta`` and
    ``rope_scaling``. When both are present, ``rope_scaling`` is the one that
    counts, as in transformers (4.x knows no other; 5.x lets it replace
    ``rope_parameters`` whole). Plain RoPE and YaRN are supported; other
    scalings (linear, dynamic, llama3, longrope, ...) change the frequencies
    in ways moejax does not implement and are rejected by name.
    """
    params, scaling = hf.mapping("rope_parameters"), hf.mapping("rope_scaling")
    hf.used.add("rope_theta")
    source, entry = ("rope_scaling", scaling) if scaling else ("rope_parameters", params)
    kind = entry.get("rope_type", entry.get("type", "default"))
    if kind not in ("default", "yarn"):
        raise UnsupportedConfigError(f"{hf.model_type} config.json: {source} rope_type={kind!r} is not "
                                     "supported (plain RoPE and 'yarn' are)")
    allowed = {"rope_type", "type", "rope_theta"} | (YARN_KEYS if kind == "yarn" else set())
    extra = sorted(set(entry) - allowed)
    if extra:
        raise UnsupportedConfigError(f"{hf.model_type} config.json: {source} option(s) {', '.join(extra)} "
                                     f"are not supported with rope_type={kind!r}")
    theta = float(entry.get("rope_theta") or hf.data.get("rope_theta") or default_theta)
    if kind == "default":
        return theta, None, 1.0
    original = entry.get("original_max_position_embeddings")
    if not original:
        raise UnsupportedConfigError(f"{hf.model_type} config.json: yarn needs "
                                     "original_max_position_embeddings")
    factor = float(entry.get("factor") or max_positions / original)
    attention_factor = entry.get("attention_factor")
    mscale, mscale_all_dim = entry.get("mscale"), entry.get("mscale_all_dim")
    if attention_factor is None:  # transformers' inference of the cos/sin magnitude
        attention_factor = (yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
                            if mscale and mscale_all_dim else yarn_mscale(factor))
    yarn = YarnConfig(factor=factor, original_max_position_embeddings=int(original),
                      beta_fast=float(entry.get("beta_fast") or 32), beta_slow=float(entry.get("beta_slow") or 1),
                      attention_factor=float(attention_factor), truncate=bool(entry.get("truncate", True)))
    softmax_mscale = yarn_mscale(factor, mscale_all_dim) ** 2 if mscale_all_dim else 1.0
    return theta, yarn, softmax_mscale


def write_rope(cfg, softmax_mscale: float = 1.0) -> dict[str, Any]:
    """config.json keys for the model's RoPE, for transformers 5 and 4.x."""
    out: dict[str, Any] = {"rope_theta": cfg.rope_theta}
    yarn = cfg.rope_yarn
    if yarn is None:
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
        return out
    params = {"rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": yarn.factor,
              "original_max_position_embeddings": yarn.original_max_position_embeddings,
              "beta_fast": yarn.beta_fast, "beta_slow": yarn.beta_slow,
              "attention_factor": yarn.attention_factor, "truncate": yarn.truncate}
    if softmax_mscale != 1.0:  # the mscale_all_dim that reproduces it (DeepSeek)
        params["mscale_all_dim"] = (math.sqrt(softmax_mscale) - 1.0) / (0.1 * math.log(yarn.factor))
    out["rope_parameters"] = params
    # transformers 4.x reads only rope_scaling, and 5.x lets it override rope_parameters, so it
    # must carry every parameter that changes the frequencies; truncate=True is the default
    # (and a key older 4.x releases warn about), so it is written only when it is False.
    out["rope_scaling"] = {k: v for k, v in params.items()
                           if k != "rope_theta" and (k != "truncate" or not yarn.truncate)}
    return out


def read_head_dim(hf: HFConfig, d_model: int, n_heads: int) -> int | None:
    """Explicit head_dim, or None when it is d_model / n_heads."""
    head_dim = hf.get("head_dim")
    if head_dim is None or head_dim * n_heads == d_model and d_model % n_heads == 0:
        return None
    return head_dim


def write_common(cfg, model_type: str, architecture: str) -> dict[str, Any]:
    """The config.json keys every family writes, for both transformers 4.x and 5.x."""
    return {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": cfg.max_seq_len,
        "attention_dropout": 0.0,
        **write_rope(cfg, cfg.mla.softmax_mscale if cfg.mla is not None else 1.0),
        "torch_dtype": "float32",
        "use_cache": True,
    }
