import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moejax
from moejax.routing import RouterBias
from tests.moe_helpers import assert_close


@pytest.mark.parametrize("name", ["tiny", "deepseek-mini", "qwen3-moe-mini"])
def test_logits_are_causal(name):
    cfg = moejax.ModelConfig.preset(name)
    model = moejax.Transformer(cfg, rngs=nnx.Rngs(0))
    forward = nnx.jit(lambda m, t: m(t)[0])
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, cfg.vocab_size)
    changed = tokens.at[:, 7].set((tokens[:, 7] + 1) % cfg.vocab_size)
    before, after = forward(model, tokens), forward(model, changed)
    np.testing.assert_array_equal(np.asarray(before[:, :7]), np.asarray(after[:, :7]))
    assert not np.allclose(before[:, 7:], after[:, 7:])


def test_ffn_kinds_place_the_moe_layers():
    kinds = ("dense", "moe", "dense", "moe", "dense", "moe")
    cfg = moejax.ModelConfig.preset("tiny").replace(n_layers=6, ffn_kinds=kinds)
    model = moejax.Transformer(cfg, rngs=nnx.Rngs(0))
    assert [isinstance(b.ffn, moejax.MoE) for b in model.layers] == [k == "moe" for k in kinds]
    assert cfg.num_moe_layers == 3 and model.moe_layers == [model.layers[i].ffn for i in (1, 3, 5)]
    _, aux = nnx.jit(lambda m, t: m(t))(model, jnp.zeros((1, 4), jnp.int32))
    assert aux["expert_load"].shape == (3, cfg.moe.num_experts)


def test_tied_embeddings_share_the_table():
    cfg = moejax.ModelConfig.preset("tiny").replace(tie_embeddings=True, n_layers=1, ffn_kinds=("moe",))
    model = moejax.Transformer(cfg, rngs=nnx.Rngs(0))
    assert not hasattr(model, "lm_head")
    tokens = jnp.arange(8)[None]
    forward = nnx.jit(lambda m, t: m(t)[0])
    logits = forward(model, tokens)
    model.embed[...] = model.embed[...] * 2.0
    logits2 = forward(model, tokens)
    assert not np.allclose(logits, logits2)


def test_router_bias_update_through_the_model():
    cfg = moejax.ModelConfig.preset("deepseek-mini")   # a dense layer, then two MoE layers
    cfg = cfg.replace(n_layers=3, ffn_kinds=cfg.ffn_kinds[:3])
    model = moejax.Transformer(cfg, rngs=nnx.Rngs(0))
    biases = nnx.state(model, RouterBias)
    assert len(jax.tree.leaves(biases)) == cfg.num_moe_layers == 2
    assert len(jax.tree.leaves(nnx.state(model, nnx.Param))) > 0
    _, aux = nnx.jit(lambda m, t: m(t))(model, jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size))
    load = aux["expert_load"]
    model.update_router_biases(load)
    rate = cfg.moe.bias_update_rate
    for layer, moe in enumerate(model.moe_layers):
        want = rate * np.sign(np.mean(load[layer]) - np.asarray(load[layer]))
        np.testing.assert_allclose(moe.router.bias[...], want, rtol=1e-6)


def test_bfloat16_compute_tracks_float32():
    # A dense model: with MoE, a bf16 rounding can flip a routing decision,
    # which is a legitimate discrete change (the MoE layer is checked below).
    cfg = moejax.ModelConfig.preset("dense-tiny")
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, cfg.vocab_size)
    ref, _ = moejax.Transformer(cfg, rngs=nnx.Rngs(0))(tokens)
    model = moejax.Transformer(cfg.replace(dtype="bfloat16"), rngs=nnx.Rngs(0))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    got, _ = model(tokens)
    assert got.dtype == jnp.float32
    # bf16 keeps 8 mantissa bits (relative step 2^-8 = 0.4%); errors add over 4 layers.
    assert_close(got, ref, rtol=5e-2, what="bf16 logits")


@pytest.mark.parametrize("backend", ["dense", "ragged"])
def test_bfloat16_moe_layer_routes_in_float32(backend):
    cfg = moejax.MoEConfig(d_model=32, d_ff=64, num_experts=8, top_k=2, dispatch=backend,
                           num_shared_experts=1)
    x = jax.random.normal(jax.random.key(0), (2, 8, 32))
    ref, ref_aux = moejax.MoE(cfg, rngs=nnx.Rngs(0))(x)
    got, aux = moejax.MoE(cfg.replace(dtype="bfloat16"), rngs=nnx.Rngs(0))(x)
    np.testing.assert_array_equal(aux["expert_load"], ref_aux["expert_load"])
    assert got.dtype == x.dtype
    assert_close(got, ref, rtol=2e-2, what="bf16 MoE output")


def test_tokens_must_be_two_dimensional():
    model = moejax.Transformer(moejax.ModelConfig.preset("tiny"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        model(jnp.zeros((4,), jnp.int32))
