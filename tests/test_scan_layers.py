"""Scanned layers (nnx.scan over stacked parameters) and remat equal the unrolled model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import ModelConfig, Transformer, sharding
from moejax.checkpoint import load_model, save_model
from moejax.layer_stack import layer_groups, stack_layers, unstack_layers
from tests.decode_helpers import check_prefill_then_steps

VOCAB = 64


def config(**changes) -> ModelConfig:
    # MLA + a dense layer then two MoE layers: two scan groups of different kinds
    cfg = ModelConfig.preset("deepseek-mini")
    return cfg.replace(n_layers=3, ffn_kinds=("dense", "moe", "moe"), vocab_size=VOCAB, **changes)


def pair(**changes):
    """An unrolled model and a scanned one holding the same weights."""
    unrolled = Transformer(config(**changes), rngs=nnx.Rngs(0))
    scanned_cfg = config(scan_layers=True, **changes)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(scanned_cfg, rngs=nnx.Rngs(1))))
    nnx.replace_by_pure_dict(state, stack_layers(nnx.to_pure_dict(nnx.state(unrolled)), scanned_cfg))
    return unrolled, nnx.merge(graphdef, state)


def loss_and_grads(model, tokens):
    def loss(model):
        logits, aux = model(tokens)
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1)) + aux["router_loss"], aux
    (value, aux), grads = nnx.value_and_grad(loss, has_aux=True)(model)
    return value, aux, nnx.to_pure_dict(grads)


def assert_close(a, b, rtol=2e-5):
    scale = max(float(np.max(np.abs(b))), 1e-30)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=rtol * scale)


def test_layer_groups_are_runs_of_one_kind():
    assert layer_groups(config()) == [(0, 1), (1, 2)]
    assert layer_groups(ModelConfig.preset("tiny")) == [(0, 4)]


@pytest.fixture(scope="module")
def unrolled_reference():
    """Loss, aux and gradients of the plain unrolled model (the reference for every variant)."""
    unrolled = Transformer(config(), rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (2, 8)), jnp.int32)
    return unrolled, tokens, jax.jit(loss_and_grads)(unrolled, tokens)


@pytest.mark.parametrize("scan, remat", [(True, "none"), (True, "full"), (True, "dots"), (False, "full")])
def test_scanned_and_remat_equal_unrolled_outputs_and_gradients(unrolled_reference, scan, remat):
    unrolled, tokens, (want_loss, want_aux, want_grads) = unrolled_reference
    cfg = config(scan_layers=scan, remat=remat)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(1))))
    nnx.replace_by_pure_dict(state, stack_layers(nnx.to_pure_dict(nnx.state(unrolled)), cfg))
    loss, aux, grads = jax.jit(loss_and_grads)(nnx.merge(graphdef, state), tokens)
    assert_close(loss, want_loss)
    for key in ("aux_loss", "router_loss", "expert_load", "dropped_fraction"):
        assert_close(aux[key], want_aux[key])
    assert aux["expert_load"].shape == (2, 32)
    jax.tree.map(assert_close, unstack_layers(grads, cfg), want_grads)


def test_stack_and_unstack_are_inverse():
    _, scanned = pair()
    cfg = scanned.cfg
    pure = nnx.to_pure_dict(nnx.state(scanned))
    flat = unstack_layers(pure, cfg)
    assert sorted(flat["layers"]) == [0, 1, 2] and "stacks" not in flat
    jax.tree.map(np.testing.assert_array_equal, stack_layers(flat, cfg), pure)


def test_stacked_parameters_carry_a_leading_layers_axis_for_sharding():
    cfg = config(scan_layers=True)
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    w_gate = abstract.stacks[1].block.ffn.experts.w_gate
    assert w_gate.shape == (2, 32, 256, 128)
    assert w_gate.get_metadata()["logical_axes"] == ("layers", "expert", "embed", "mlp")
    mesh = sharding.make_mesh("data=2,expert=4")
    assert sharding.variable_spec(w_gate, mesh) == jax.sharding.PartitionSpec(None, "expert", None, None)
    specs = sharding.state_shardings(nnx.state(abstract), mesh)   # every variable has a spec
    assert len(jax.tree.leaves(specs)) == len(jax.tree.leaves(nnx.state(abstract)))


def test_update_router_biases_scanned_like_unrolled():
    cfg_changes = dict(moe=config().moe.replace(bias_update_rate=0.1))
    unrolled, scanned = pair(**cfg_changes)
    load_LE = jnp.asarray(np.random.default_rng(0).dirichlet(np.ones(32), size=2), jnp.float32)
    unrolled.update_router_biases(load_LE)
    scanned.update_router_biases(load_LE)
    want = [m.router.bias[...] for m in unrolled.moe_layers]
    got = scanned.moe_layers[0].router.bias[...]
    assert not np.allclose(want[0], want[1])
    np.testing.assert_allclose(got, np.stack(want), rtol=1e-6)


def test_scanned_checkpoint_round_trip(tmp_path):
    _, scanned = pair()
    save_model(tmp_path / "m", scanned, scanned.cfg)
    loaded, cfg = load_model(tmp_path / "m")
    assert cfg.scan_layers
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(loaded)),
                 nnx.to_pure_dict(nnx.state(scanned)))


@pytest.mark.parametrize("name", ["qwen3-moe-mini", "deepseek-mini"])
def test_scanned_model_decodes_with_a_stacked_cache(name):
    base = ModelConfig.preset(name)
    cfg = base.replace(n_layers=3, ffn_kinds=base.ffn_kinds[-3:], vocab_size=VOCAB, scan_layers=True)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    cache = model.init_cache(2, 4)
    assert len(cache.layers) == len(layer_groups(cfg))
    assert all(jax.tree.leaves(layer)[0].shape[0] == count
               for layer, (_, count) in zip(cache.layers, layer_groups(cfg)))
    check_prefill_then_steps(model, VOCAB)


def test_quantize_experts_of_scanned_layers_like_unrolled():
    import moejax
    unrolled, scanned = pair()
    for model in (unrolled, scanned):
        moejax.quantize_experts(model)
    q_gate = scanned.stacks[1].block.ffn.experts.q_gate
    assert q_gate.shape == (2, 32, 256, 128) and q_gate.get_metadata()["logical_axes"][0] == "layers"
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, VOCAB, (2, 8)), jnp.int32)
    logits = jax.jit(lambda m, t: m(t)[0])
    assert_close(logits(scanned, tokens), logits(unrolled, tokens), rtol=1e-5)
