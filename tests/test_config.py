import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import moejax
from moejax.config import (ConfigError, MemoryConfig, MLAConfig, YarnConfig, config_from_dict,
                           config_to_dict)

BASE = dict(d_model=16, d_ff=32, num_experts=8, top_k=2)


@pytest.mark.parametrize("changes, field", [
    (dict(top_k=9), "top_k"),
    (dict(top_k=0), "top_k"),
    (dict(n_group=3), "n_group"),
    (dict(n_group=4, topk_group=5), "topk_group"),
    (dict(n_group=4, topk_group=1, top_k=3), "topk_group"),
    (dict(router="relu"), "router"),
    (dict(dispatch="magic"), "dispatch"),
    (dict(dispatch="capacity"), "capacity_factor"),
    (dict(capacity_factor=0.0), "capacity_factor"),
    # dropless backends: the factor was ignored on one device but dropped pairs under EP
    (dict(dispatch="ragged", capacity_factor=0.5), "capacity_factor"),
    (dict(dispatch="gmm", capacity_factor=1.0), "capacity_factor"),
    (dict(dispatch="dense", capacity_factor=2.0), "capacity_factor"),
    (dict(shared_expert_gate=True), "shared_expert_gate"),
    (dict(routed_scaling_factor=0.0), "routed_scaling_factor"),
    (dict(aux_loss_coef=-1.0), "aux_loss_coef"),
    (dict(dtype="int8"), "dtype"),
    (dict(d_model=1.5), "d_model"),
    # wrong types and non-finite numbers: ConfigError naming the field, not a TypeError
    # from a comparison, nor an inf that fails later (math.ceil in the capacity)
    (dict(capacity_factor="1.25"), "capacity_factor"),
    (dict(capacity_factor=float("inf")), "capacity_factor"),
    (dict(capacity_factor=True), "capacity_factor"),
    (dict(routed_scaling_factor="2.5"), "routed_scaling_factor"),
    (dict(routed_scaling_factor=float("inf")), "routed_scaling_factor"),
    (dict(aux_loss_coef=None), "aux_loss_coef"),
    (dict(z_loss_coef=float("inf")), "z_loss_coef"),
    (dict(bias_update_rate="0.001"), "bias_update_rate"),
    (dict(bias_update_rate=0.001), "bias_update_rate"),     # softmax: no bias, it did nothing
    (dict(norm_topk_prob="false"), "norm_topk_prob"),
    (dict(num_shared_experts=True), "num_shared_experts"),
    (dict(num_shared_experts=1, shared_d_ff=True), "shared_d_ff"),   # a bool is no width
])
def test_bad_moe_config_names_the_field(changes, field):
    with pytest.raises(ConfigError, match=rf"MoEConfig\.{field}\b"):
        moejax.MoEConfig(**{**BASE, **changes})


@pytest.mark.parametrize("changes, field", [
    (dict(n_kv_heads=3), "n_kv_heads"),
    (dict(d_model=130), "head_dim"),
    (dict(head_dim=7), "head_dim"),
    (dict(ffn_kinds=("moe",) * 3), "ffn_kinds"),           # wrong length
    (dict(ffn_kinds=("moe", "moe", "mlp", "moe")), "ffn_kinds"),  # unknown kind
    (dict(ffn_kinds=["moe"] * 4), "ffn_kinds"),             # not a tuple
    (dict(moe=None, ffn_kinds=("dense", "moe", "dense", "dense")), "ffn_kinds"),  # moe without MoEConfig
    (dict(qk_norm="layer"), "qk_norm"),
    (dict(moe=moejax.MoEConfig(**{**BASE, "d_model": 32})), "moe"),
    (dict(head_dim="32"), "head_dim"),                     # not a number (no TypeError)
    (dict(rope_theta=-1.0), "rope_theta"),                 # NaN angles
    (dict(rope_theta=0), "rope_theta"),
    (dict(rms_norm_eps=-1e-6), "rms_norm_eps"),
    (dict(tie_embeddings="no"), "tie_embeddings"),
    (dict(attention_bias=1), "attention_bias"),
])
def test_bad_model_config_names_the_field(changes, field):
    base = moejax.ModelConfig.preset("tiny")
    with pytest.raises(ConfigError, match=rf"ModelConfig\.{field}\b"):
        base.replace(**changes)


@pytest.mark.parametrize("cls, changes, field", [
    (YarnConfig, dict(beta_fast=-1.0), "beta_fast"),       # the correction bounds take its log
    (YarnConfig, dict(beta_slow=0.0), "beta_slow"),
    (YarnConfig, dict(factor="2"), "factor"),
    (YarnConfig, dict(truncate="yes"), "truncate"),
    (MLAConfig, dict(softmax_mscale="1"), "softmax_mscale"),
    (MLAConfig, dict(q_lora_rank=True), "q_lora_rank"),    # a bool is not a rank (was built as 1)
    (MemoryConfig, dict(share_values="no"), "share_values"),
    (MemoryConfig, dict(d_value=True), "d_value"),
])
def test_bad_nested_config_names_the_field(cls, changes, field):
    base = {YarnConfig: dict(factor=4.0, original_max_position_embeddings=64),
            MLAConfig: dict(kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=2, v_head_dim=4),
            MemoryConfig: {}}[cls]
    with pytest.raises(ConfigError, match=rf"{cls.__name__}\.{field}\b"):
        cls(**{**base, **changes})


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="tiny"):
        moejax.ModelConfig.preset("nope")


@pytest.mark.parametrize("name", moejax.ModelConfig.preset_names())
def test_every_preset_builds_runs_jitted_and_round_trips(name):
    cfg = moejax.ModelConfig.preset(name)
    assert config_from_dict(config_to_dict(cfg)) == cfg
    model = moejax.Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, cfg.vocab_size)
    logits, aux = nnx.jit(lambda m, t: m(t))(model, tokens)
    assert logits.shape == (2, 8, cfg.vocab_size) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    if cfg.moe is not None:
        assert aux["expert_load"].shape == (cfg.num_moe_layers, cfg.moe.num_experts)
        assert jnp.allclose(aux["expert_load"].sum(-1), 1.0)
