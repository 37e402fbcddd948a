"""The FFN protocol: kinds from the registry, the typed aux and its reduction, old configs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moejax
from moejax import layers
from moejax.config import ConfigError, config_from_dict, config_to_dict
from moejax.layers import LayerAux, LayerContext

# config.json of deepseek-mini as `python -m train` wrote it before ffn_kinds existed
OLD_DEEPSEEK_MINI = json.loads("""{"vocab_size": 1024, "d_model": 256, "n_layers": 4, "n_heads": 8,
"n_kv_heads": 8, "d_ff": 768, "head_dim": null, "moe": {"d_model": 256, "d_ff": 128,
"num_experts": 32, "top_k": 4, "num_shared_experts": 1, "shared_d_ff": null,
"shared_expert_gate": false, "router": "sigmoid", "norm_topk_prob": true,
"routed_scaling_factor": 2.5, "n_group": 4, "topk_group": 2, "capacity_factor": null,
"dispatch": "auto", "aux_loss_coef": 0.0001, "aux_loss_type": "sequence", "z_loss_coef": 0.001,
"bias_update_rate": 0.001, "dtype": "float32", "ep_exchange": "auto"}, "first_k_dense": 1,
"moe_every": 1, "max_seq_len": 2048, "rope_theta": 10000.0, "rms_norm_eps": 1e-06,
"tie_embeddings": false, "qk_norm": "none", "attention_bias": false, "dtype": "float32",
"name": "deepseek-mini", "moe_layers": null, "mla": {"kv_lora_rank": 64, "qk_nope_head_dim": 32,
"qk_rope_head_dim": 16, "v_head_dim": 32, "q_lora_rank": 96, "latent_norm_eps": 1e-06,
"softmax_mscale": 1.0}, "rope_yarn": null}""")


def test_old_config_json_loads_as_ffn_kinds():
    cfg = config_from_dict(OLD_DEEPSEEK_MINI)
    assert cfg == moejax.ModelConfig.preset("deepseek-mini")
    assert cfg.ffn_kinds == ("dense", "moe", "moe", "moe")
    every_other = {**OLD_DEEPSEEK_MINI, "first_k_dense": 0, "moe_every": 2}
    assert config_from_dict(every_other).ffn_kinds == ("moe", "dense", "moe", "dense")
    listed = {**OLD_DEEPSEEK_MINI, "first_k_dense": 0, "moe_layers": [1, 2]}
    assert config_from_dict(listed).ffn_kinds == ("dense", "moe", "moe", "dense")
    with pytest.raises(ConfigError, match="ffn_kinds together"):
        config_from_dict({**OLD_DEEPSEEK_MINI, "ffn_kinds": ["moe"] * 4})
    with pytest.raises(ConfigError, match="moe_every"):
        config_from_dict({**OLD_DEEPSEEK_MINI, "moe_every": 0})


def test_replace_rederives_a_default_placement_only():
    tiny = moejax.ModelConfig.preset("tiny")
    assert tiny.replace(n_layers=2).ffn_kinds == ("moe", "moe")
    assert tiny.replace(moe=None).ffn_kinds == ("dense",) * 4
    deepseek = moejax.ModelConfig.preset("deepseek-mini")
    with pytest.raises(ConfigError, match="ffn_kinds"):  # an explicit placement is not guessed
        deepseek.replace(n_layers=6)
    assert config_from_dict(json.loads(json.dumps(config_to_dict(deepseek)))) == deepseek


def _aux(load, dropped, **extra):
    one = jnp.ones((), jnp.float32)
    return LayerAux(aux_loss=one, z_loss=2 * one, router_loss=3 * one, dropped_fraction=dropped,
                    expert_load=jnp.asarray(load, jnp.float32), **extra)


def test_layer_aux_reduces_each_field_by_its_rule():
    layer_auxes = [_aux([1.0, 0.0], jnp.float32(0.5)), LayerAux(),
                   _aux([0.25, 0.75], jnp.float32(0.0), ep_overflow=jnp.float32(4.0))]
    total = LayerAux.reduce(layer_auxes)
    assert float(total["aux_loss"]) == 2.0 and float(total["router_loss"]) == 6.0
    assert float(total["dropped_fraction"]) == 0.25   # mean over the two MoE layers, not three
    np.testing.assert_array_equal(total["expert_load"], [[1.0, 0.0], [0.25, 0.75]])
    assert float(total["ep_overflow"]) == 4.0 and float(total["dispatch_bytes"]) == 0.0
    empty = LayerAux.reduce([LayerAux(), LayerAux()])
    assert empty["expert_load"].shape == (0, 0) and float(empty["aux_loss"]) == 0.0
    assert set(total.keys()) == {f for f in LayerAux._names()}
    assert "expert_load" not in LayerAux() and LayerAux().get("aux_loss") is None
    with pytest.raises(KeyError):
        total["nope"]
    # a pytree: jit returns it, tree.map maps its arrays
    doubled = jax.jit(lambda a: jax.tree.map(lambda v: 2 * v, a))(total)
    assert isinstance(doubled, LayerAux) and float(doubled["z_loss"]) == 8.0


class _ScaledIdentity(nnx.Module):
    """A test FFN kind: y = scale * x, reports a constant aux_loss, reads the context."""

    def __init__(self, cfg, layer, *, rngs):
        self.scale = nnx.Param(jnp.full((), 0.5 + layer, jnp.float32))
        self.seen_tokens = nnx.Variable(jnp.zeros((), jnp.int32))

    def __call__(self, x_BSD, ctx: LayerContext):
        self.seen_tokens[...] = jnp.sum(ctx.tokens_BS)
        return x_BSD * self.scale[...], LayerAux(aux_loss=jnp.float32(10.0))


def test_a_registered_kind_plugs_in_without_touching_the_block():
    layers.register_ffn_kind("scaled_identity_test", _ScaledIdentity)
    try:
        kinds = ("scaled_identity_test", "moe", "dense")
        cfg = moejax.ModelConfig.preset("tiny").replace(n_layers=3, ffn_kinds=kinds)
        model = moejax.Transformer(cfg, rngs=nnx.Rngs(0))
        tokens = jnp.arange(6, dtype=jnp.int32).reshape(1, 6)
        _, aux = nnx.jit(lambda m, t: m(t))(model, tokens)
        assert float(model.layers[0].ffn.seen_tokens[...]) == 15
        moe_aux = model.layers[1].ffn(jnp.zeros((1, 1, cfg.d_model)))[1]
        assert float(aux["aux_loss"]) > 10.0 and moe_aux["aux_loss"] is not None
        assert aux["expert_load"].shape == (1, cfg.moe.num_experts)
    finally:
        del layers.FFN_KINDS["scaled_identity_test"]
    with pytest.raises(ConfigError, match="unknown kind 'scaled_identity_test'"):
        moejax.ModelConfig.preset("tiny").replace(n_layers=1, ffn_kinds=("scaled_identity_test",))
