"""Tiny random reference models built with ``transformers`` (PyTorch, CPU).

Every parameter is re-drawn (norm scales around 1, DeepSeek's selection bias
non-zero) so that a mapping which swaps, transposes or drops a tensor shows
up in the logits. Error metric used by the tests::

    rel_err(ours, ref) = max |ours - ref| / max |ref|     (over the whole [B, S, V] batch)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

VOCAB = 97
SEQ = 25          # one token shape everywhere: one compile per case

# the first DeepSeek-V3 case, which the one without shared experts varies
DEEPSEEK_A = dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                  num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, n_routed_experts=8,
                  num_experts_per_tok=2, n_group=2, topk_group=1,
                  n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16,
                  q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8,
                  v_head_dim=12, routed_scaling_factor=2.5)

# name -> (model_type, config kwargs). Widths, head counts, expert counts and
# top-k differ between the two cases of each family.
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral-a": ("mixtral", dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                  num_experts_per_tok=2)),
    "mixtral-b": ("mixtral", dict(hidden_size=48, intermediate_size=40, num_hidden_layers=2,
                                  num_attention_heads=6, num_key_value_heads=3, head_dim=12,
                                  num_local_experts=6, num_experts_per_tok=3, tie_word_embeddings=True,
                                  rope_theta=1e6)),
    "qwen2_moe-a": ("qwen2_moe", dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                                      shared_expert_intermediate_size=24, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                                      num_experts_per_tok=2, norm_topk_prob=False)),
    "qwen2_moe-b": ("qwen2_moe", dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=24,
                                      shared_expert_intermediate_size=40, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=4, num_experts=8,
                                      num_experts_per_tok=3, norm_topk_prob=True, decoder_sparse_step=2,
                                      mlp_only_layers=[3])),
    "qwen3_moe-a": ("qwen3_moe", dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      head_dim=16, num_experts=4, num_experts_per_tok=2,
                                      norm_topk_prob=True)),
    "qwen3_moe-b": ("qwen3_moe", dict(hidden_size=48, intermediate_size=64, moe_intermediate_size=12,
                                      num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
                                      head_dim=8, num_experts=8, num_experts_per_tok=4,
                                      norm_topk_prob=False, mlp_only_layers=[1])),
    "olmoe-a": ("olmoe", dict(hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=4, num_experts=4,
                              num_experts_per_tok=2)),
    "olmoe-b": ("olmoe", dict(hidden_size=48, intermediate_size=24, num_hidden_layers=2,
                              num_attention_heads=6, num_key_value_heads=2, num_experts=8,
                              num_experts_per_tok=3, norm_topk_prob=True)),
    "deepseek_v3-a": ("deepseek_v3", DEEPSEEK_A),
    "deepseek_v3-b": ("deepseek_v3", dict(hidden_size=48, intermediate_size=64, moe_intermediate_size=12,
                                          num_hidden_layers=2, num_attention_heads=3,
                                          num_key_value_heads=3, n_routed_experts=8,
                                          num_experts_per_tok=3, n_group=4, topk_group=2,
                                          n_shared_experts=2, first_k_dense_replace=0, kv_lora_rank=12,
                                          q_lora_rank=None, qk_rope_head_dim=4, qk_nope_head_dim=6,
                                          v_head_dim=10, routed_scaling_factor=1.5, norm_topk_prob=False,
                                          rope_interleave=False)),
    # n_shared_experts=0: transformers still builds the shared experts, 0 wide (empty tensors)
    "deepseek_v3-noshared": ("deepseek_v3", {**DEEPSEEK_A, "n_routed_experts": 4, "n_shared_experts": 0}),
    # YaRN: blended frequencies, cos/sin magnitude, (DeepSeek) the softmax mscale, (Qwen3)
    # untruncated correction range with non-default betas.
    "deepseek_v3-yarn": ("deepseek_v3", dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                                             num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=4, n_routed_experts=4,
                                             num_experts_per_tok=2, n_group=1, topk_group=1,
                                             n_shared_experts=1, first_k_dense_replace=1,
                                             kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
                                             qk_nope_head_dim=8, v_head_dim=12, max_position_embeddings=256,
                                             rope_parameters=dict(rope_type="yarn", rope_theta=100.0,
                                                                  factor=4.0, beta_fast=32, beta_slow=1,
                                                                  original_max_position_embeddings=64,
                                                                  mscale=1.0, mscale_all_dim=0.8))),
    "qwen3_moe-yarn": ("qwen3_moe", dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=16, num_experts=4, num_experts_per_tok=2,
                                         max_position_embeddings=64,
                                         rope_parameters=dict(rope_type="yarn", rope_theta=1000.0, factor=2.0,
                                                              original_max_position_embeddings=32,
                                                              beta_fast=8.0, beta_slow=0.5, truncate=False))),
}

CONFIG_CLASSES = {
    "mixtral": transformers.MixtralConfig,
    "qwen2_moe": transformers.Qwen2MoeConfig,
    "qwen3_moe": transformers.Qwen3MoeConfig,
    "olmoe": transformers.OlmoeConfig,
    "deepseek_v3": transformers.DeepseekV3Config,
}


def make_config(model_type: str, **kwargs) -> transformers.PretrainedConfig:
    kwargs = dict(vocab_size=VOCAB, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                  **kwargs)
    rope = kwargs.pop("rope_parameters", {"rope_type": "default",
                                          "rope_theta": kwargs.pop("rope_theta", 10000.0)})
    config = CONFIG_CLASSES[model_type](**kwargs)
    config.rope_parameters = dict(rope)
    return config


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Redraw every parameter and buffer that a checkpoint stores."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if "norm" in name:
                param.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                param.copy_(0.1 * noise)
            else:
                param.copy_(0.15 * noise)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.05 * torch.randn(buf.shape, generator=gen))


@dataclass
class Reference:
    name: str
    model_type: str
    model: Any                      # the transformers model (eval mode)
    path: Path                      # save_pretrained directory (per-expert layout)
    tokens: np.ndarray              # [B, S] int
    logits: np.ndarray              # [B, S, V] float32
    extra: dict = field(default_factory=dict)


def build(name: str, directory: Path, seed: int = 0) -> Reference:
    model_type, kwargs = CASES[name]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(make_config(model_type, **kwargs))
    randomize(model, seed)
    model.eval()
    path = directory / name
    model.save_pretrained(path)
    tokens = np.random.default_rng(seed).integers(0, VOCAB, size=(2, SEQ))
    return Reference(name, model_type, model, path, tokens, hf_logits(model, tokens))


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.float().numpy()


def save_fused(ref: Reference, directory: Path) -> Path:
    """The checkpoint in transformers 5's in-memory layout (fused 3-D experts)."""
    from safetensors.torch import save_file
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in ref.model.state_dict().items()}
    if ref.model.config.tie_word_embeddings:
        state.pop("lm_head.weight")  # the embedding itself
    assert any(k.endswith("experts.gate_up_proj") for k in state), "expected fused experts"
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text((ref.path / "config.json").read_text())
    return directory


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(ours, np.float64) - ref)) / np.max(np.abs(ref)))
