"""The named model presets of ``ModelConfig.preset``: small models of each family's shape.

Pure Python like :mod:`moejax.config`, so command lines resolve a preset without jax.
"""

from __future__ import annotations

from moejax.config import MemoryConfig, MLAConfig, ModelConfig, MoEConfig, ffn_kinds_from_rule


def _tiny() -> ModelConfig:
    # Trains on a 2-core CPU in minutes on byte-level text.
    moe = MoEConfig(d_model=128, d_ff=256, num_experts=8, top_k=2, aux_loss_coef=0.01)
    return ModelConfig(name="tiny", vocab_size=256, d_model=128, n_layers=4, n_heads=4,
                       n_kv_heads=2, d_ff=512, moe=moe, max_seq_len=256)


def _mixtral_mini() -> ModelConfig:
    # Mixtral: softmax top-2 of 8, renormalised, every layer MoE, no shared expert.
    moe = MoEConfig(d_model=256, d_ff=512, num_experts=8, top_k=2, norm_topk_prob=True)
    return ModelConfig(name="mixtral-mini", vocab_size=1024, d_model=256, n_layers=4, n_heads=8,
                       n_kv_heads=2, d_ff=1024, moe=moe, rope_theta=1e6, rms_norm_eps=1e-5)


def _qwen3_moe_mini() -> ModelConfig:
    # Qwen3-MoE: many fine-grained experts, top-8, per-head q/k RMSNorm.
    moe = MoEConfig(d_model=256, d_ff=128, num_experts=32, top_k=8, norm_topk_prob=True)
    return ModelConfig(name="qwen3-moe-mini", vocab_size=1024, d_model=256, n_layers=4, n_heads=8,
                       n_kv_heads=4, head_dim=64, d_ff=768, moe=moe, qk_norm="head",
                       rope_theta=1e6)


def _deepseek_mini() -> ModelConfig:
    # DeepSeek-V3: multi-head latent attention; sigmoid scores, selection bias, group-limited top-k,
    # routed scaling, shared experts, first layer dense.
    moe = MoEConfig(d_model=256, d_ff=128, num_experts=32, top_k=4, num_shared_experts=1,
                    router="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5,
                    n_group=4, topk_group=2, aux_loss_type="sequence", aux_loss_coef=1e-4,
                    bias_update_rate=1e-3)
    mla = MLAConfig(kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                    q_lora_rank=96)
    return ModelConfig(name="deepseek-mini", vocab_size=1024, d_model=256, n_layers=4, n_heads=8,
                       n_kv_heads=8, d_ff=768, moe=moe, mla=mla,
                       ffn_kinds=ffn_kinds_from_rule(4, moe, first_k_dense=1))


def _olmoe_mini() -> ModelConfig:
    # OLMoE: softmax top-8 of 64 without renormalisation, q/k norm over projections.
    moe = MoEConfig(d_model=256, d_ff=128, num_experts=64, top_k=8, norm_topk_prob=False)
    return ModelConfig(name="olmoe-mini", vocab_size=1024, d_model=256, n_layers=2, n_heads=8,
                       n_kv_heads=8, d_ff=768, moe=moe, qk_norm="proj")


def _dense_tiny() -> ModelConfig:
    # The dense baseline with the same active parameters as `tiny` (top-2 of d_ff=256).
    return _tiny().replace(name="dense-tiny", moe=None)


def _tiny_mem() -> ModelConfig:
    # `tiny` with a product-key memory in place of the middle layer's MoE (Memory Layers at
    # Scale): 16,384 slots of width 128 (2.1M parameters), 4 heads x top-32.
    memory = MemoryConfig(num_slots=128 * 128, top_k=32, num_heads=4, d_key=64)
    return _tiny().replace(name="tiny-mem", memory=memory, ffn_kinds=("moe", "moe", "pkm", "moe"))


def _tiny_engram() -> ModelConfig:
    # `tiny` with Engram beside the MoE of layer 1 (DeepSeek places it early): 2- and 3-grams,
    # 4 hash heads each, 65,536 rows of width 32 (2.1M parameters).
    memory = MemoryConfig(ngram_orders=(2, 3), ngram_heads=4, ngram_table_rows=2**16, ngram_d_row=32)
    return _tiny().replace(name="tiny-engram", memory=memory,
                           ffn_kinds=("moe", "engram+moe", "moe", "moe"))


PRESETS = {
    "tiny": _tiny,
    "tiny-mem": _tiny_mem,
    "tiny-engram": _tiny_engram,
    "dense-tiny": _dense_tiny,
    "mixtral-mini": _mixtral_mini,
    "qwen3-moe-mini": _qwen3_moe_mini,
    "deepseek-mini": _deepseek_mini,
    "olmoe-mini": _olmoe_mini,
}
