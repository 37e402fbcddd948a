"""Config files as released on the hub (transformers 4.x format, every key
they carry) read into the expected moejax configs. Only config.json is read,
so the real sizes cost nothing.
"""

import json
import math

import pytest

from moejax.convert import read_hf_config

MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1,
    "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mixtral",
    "num_attention_heads": 32, "num_experts_per_tok": 2, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "num_local_experts": 8, "output_router_logits": False,
    "rms_norm_eps": 1e-05, "rope_theta": 1e6, "router_aux_loss_coef": 0.02, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.36.0.dev0",
    "use_cache": True, "vocab_size": 32000}

QWEN15_MOE = {
    "architectures": ["Qwen2MoeForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 5632, "max_position_embeddings": 8192, "max_window_layers": 21,
    "model_type": "qwen2_moe", "num_attention_heads": 16, "num_hidden_layers": 24,
    "num_key_value_heads": 16, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.40.0.dev0",
    "use_cache": True, "use_sliding_window": False, "vocab_size": 151936, "decoder_sparse_step": 1,
    "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632, "num_experts_per_tok": 4,
    "num_experts": 60, "norm_topk_prob": False, "output_router_logits": False,
    "router_aux_loss_coef": 0.001}

QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144,
    "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [],
    "model_type": "qwen3_moe", "moe_intermediate_size": 768, "norm_topk_prob": True,
    "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48,
    "num_key_value_heads": 4, "output_router_logits": False, "rms_norm_eps": 1e-06, "rope_scaling": None,
    "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.51.0",
    "use_cache": True, "use_sliding_window": False, "vocab_size": 151936}

OLMOE_1B_7B = {
    "architectures": ["OlmoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "clip_qkv": None, "eos_token_id": 50279, "hidden_act": "silu", "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 1024, "max_position_embeddings": 4096,
    "model_type": "olmoe", "norm_topk_prob": False, "num_attention_heads": 16, "num_experts": 64,
    "num_experts_per_tok": 8, "num_hidden_layers": 16, "num_key_value_heads": 16,
    "output_router_logits": False, "pad_token_id": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "rope_theta": 10000.0, "router_aux_loss_coef": 0.01, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.43.0.dev0", "use_cache": True,
    "vocab_size": 50304}

DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                 "AutoModel": "modeling_deepseek.DeepseekV3Model",
                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
    "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1,
    "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02,
    "intermediate_size": 18432, "kv_lora_rank": 512, "max_position_embeddings": 163840,
    "model_type": "deepseek_v3", "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8,
    "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128,
    "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1, "pretraining_tp": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280}


def read(tmp_path, config):
    (tmp_path / "config.json").write_text(json.dumps(config))
    return read_hf_config(tmp_path)[0]


def test_mixtral_8x7b(tmp_path):
    cfg = read(tmp_path, MIXTRAL_8X7B)
    assert (cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim) == (32, 32, 8, 128)
    assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.d_ff, cfg.moe.norm_topk_prob) == (8, 2, 14336, True)
    assert cfg.rope_theta == 1e6 and cfg.rms_norm_eps == 1e-5 and cfg.num_moe_layers == 32


def test_qwen15_moe(tmp_path):
    cfg = read(tmp_path, QWEN15_MOE)
    assert cfg.attention_bias and cfg.moe.shared_expert_gate and cfg.moe.shared_hidden == 5632
    assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.norm_topk_prob) == (60, 4, False)
    assert cfg.ffn_kinds == ("moe",) * 24 and cfg.num_moe_layers == 24


def test_qwen3_moe_with_sparse_step_and_mlp_only_layers(tmp_path):
    cfg = read(tmp_path, QWEN3_30B_A3B)
    assert cfg.qk_norm == "head" and cfg.resolved_head_dim == 128 and cfg.moe.norm_topk_prob
    stepped = read(tmp_path, {**QWEN3_30B_A3B, "decoder_sparse_step": 2, "mlp_only_layers": [3, 47]})
    assert stepped.ffn_kinds == tuple("moe" if i % 2 == 1 and i not in (3, 47) else "dense"
                                      for i in range(48))


def test_olmoe_1b_7b(tmp_path):
    cfg = read(tmp_path, OLMOE_1B_7B)
    assert cfg.qk_norm == "proj" and not cfg.moe.norm_topk_prob
    assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.d_ff) == (64, 8, 1024)


def test_deepseek_v3_with_yarn_and_fp8(tmp_path):
    cfg = read(tmp_path, DEEPSEEK_V3)
    mla, moe, yarn = cfg.mla, cfg.moe, cfg.rope_yarn
    assert (mla.q_lora_rank, mla.kv_lora_rank, mla.qk_nope_head_dim, mla.qk_rope_head_dim,
            mla.v_head_dim) == (1536, 512, 128, 64, 128)
    assert (moe.router, moe.n_group, moe.topk_group, moe.routed_scaling_factor) == ("sigmoid", 8, 4, 2.5)
    assert moe.shared_hidden == 2048 and cfg.ffn_kinds == ("dense",) * 3 + ("moe",) * 58
    # mscale == mscale_all_dim: cos/sin keep their size, the softmax scale grows by (0.1 ln 40 + 1)^2.
    assert yarn.factor == 40 and yarn.original_max_position_embeddings == 4096
    assert yarn.attention_factor == pytest.approx(1.0)
    assert mla.softmax_mscale == pytest.approx((0.1 * math.log(40) + 1) ** 2)
