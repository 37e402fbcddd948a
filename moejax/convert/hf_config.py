"""Reading Hugging Face ``config.json`` dicts strictly: every key is either
used, known to be inert (metadata, training-only switches at their neutral
value), or rejected with a message that names it. Nothing is ignored silently.
"""

from __future__ import annotations

from typing import Any


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


def read_common(hf: HFConfig, *, rope_theta: float = 10000.0, rms_norm_eps: float = 1e-6
                ) -> dict[str, Any]:
    """Fields every supported family shares -> ModelConfig keyword arguments.

    ``rope_theta`` / ``rms_norm_eps`` are the family's transformers defaults,
    used when config.json leaves the key out.
    """
    hf.expect("hidden_act", ("silu",), "experts and dense FFNs are SwiGLU")
    hf.expect("attention_dropout", (0.0, 0), "moejax attention has no dropout")
    n_heads = hf.require("num_attention_heads")
    return dict(
        vocab_size=hf.require("vocab_size"),
        d_model=hf.require("hidden_size"),
        n_layers=hf.require("num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        rope_theta=float(read_rope_theta(hf, rope_theta)),
        rms_norm_eps=float(hf.get("rms_norm_eps", rms_norm_eps)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_seq_len=int(hf.data.get("max_position_embeddings") or 2048),
    )


def read_rope_theta(hf: HFConfig, default: float = 10000.0) -> float:
    """RoPE base from ``rope_parameters`` (transformers 5) or ``rope_theta`` (4.x).

    Only plain RoPE is supported; scaled variants (linear, dynamic, yarn,
    llama3, ...) change the frequencies and are rejected by name.
    """
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for source, entry in (("rope_parameters", params), ("rope_scaling", scaling)):
        kind = entry.get("rope_type", entry.get("type", "default"))
        if kind != "default":
            raise UnsupportedConfigError(
                f"{hf.model_type} config.json: {source} rope_type={kind!r} is not supported "
                f"(only plain RoPE, rope_type='default')")
        extra = sorted(set(entry) - {"rope_type", "type", "rope_theta"})
        if extra:
            raise UnsupportedConfigError(
                f"{hf.model_type} config.json: {source} option(s) {', '.join(extra)} are not supported")
    theta = params.get("rope_theta")
    if theta is None:
        theta = hf.get("rope_theta", default)
    hf.used.add("rope_theta")
    return theta


def read_head_dim(hf: HFConfig, d_model: int, n_heads: int) -> int | None:
    """Explicit head_dim, or None when it is d_model / n_heads."""
    head_dim = hf.get("head_dim")
    if head_dim is None or head_dim * n_heads == d_model and d_model % n_heads == 0:
        return None
    return int(head_dim)


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
        # 5.x reads rope_parameters, 4.x reads rope_theta; both describe plain RoPE.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "torch_dtype": "float32",
        "use_cache": True,
    }
