"""The `tiny` Transformer sharded over 8 virtual CPU devices against the
single-device model with dense dispatch; and the sharded train step exported
for TPU on a 2x4 mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import moejax
from moejax import sharding

BATCH, SEQ = 8, 16


def tiny(**moe_changes):
    cfg = moejax.ModelConfig.preset("tiny")
    return cfg.replace(moe=cfg.moe.replace(**moe_changes))


def build(cfg):
    """The tiny model with uneven routing in every MoE layer: a constant +3 on
    feature 0 of every embedding survives the norms, and the routers favour
    expert 0, then 1, and never pick the last three experts."""
    model = moejax.Transformer(cfg, rngs=nnx.Rngs(0))
    model.embed[...] = model.embed[...].at[:, 0].add(3.0)
    for moe in model.moe_layers:
        k_DE = np.array(moe.router.kernel[...])
        k_DE[0, 0], k_DE[0, 1], k_DE[0, -3:] = 4.0, 2.0, -6.0
        moe.router.kernel[...] = jnp.asarray(k_DE)
    return model


def tokens():
    return jax.random.randint(jax.random.key(3), (BATCH, SEQ + 1), 0, 256, jnp.int32)


def lm_loss(model, tokens_BS):
    logits, aux = model(tokens_BS[:, :-1])
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.mean(jnp.take_along_axis(logp, tokens_BS[:, 1:, None], axis=-1))
    return nll + aux["router_loss"], (logits, aux)


def loss_and_grads(model, toks, mesh=None):
    fn = nnx.jit(nnx.value_and_grad(lm_loss, has_aux=True))
    if mesh is None:
        return fn(model, toks)
    with jax.set_mesh(mesh):
        sharding.shard_model(model, mesh)
        return fn(model, toks)


@pytest.fixture(scope="module")
def dense_reference():
    return loss_and_grads(build(tiny(dispatch="dense")), tokens())


def assert_close(actual, expected, rtol=1e-5):
    for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a - b).max() <= rtol * max(np.abs(b).max(), 1e-30)


@pytest.mark.parametrize("mesh_spec, exchange", [
    ("data=8", "all_to_all"), ("data=2,expert=4", "all_to_all"), ("expert=8", "all_to_all"),
    ("fsdp=2,expert=2,tensor=2", "all_to_all")])   # ragged: layer tests + train-step export
def test_sharded_tiny_model_matches_dense_reference(mesh_spec, exchange, dense_reference):
    (loss_ref, (logits_ref, aux_ref)), grads_ref = dense_reference
    load_LE = np.asarray(aux_ref["expert_load"])
    assert (load_LE == 0).sum(axis=1).min() >= 1 and load_LE.max(axis=1).min() >= 0.3
    (loss, (logits, aux)), grads = loss_and_grads(build(tiny(ep_exchange=exchange)), tokens(),
                                                  sharding.make_mesh(mesh_spec))
    assert_close(loss, loss_ref)
    assert_close(logits, logits_ref)
    assert_close(grads, grads_ref)
    assert_close(aux["expert_load"], aux_ref["expert_load"])
    assert float(aux["ep_overflow"]) == 0.0
    assert (float(aux["dispatch_bytes"]) > 0) == ("expert" in mesh_spec)


@pytest.mark.parametrize("exchange", ["all_to_all", "ragged"])
def test_sharded_train_step_exports_for_tpu(exchange):
    """loss + grad + AdamW update, parameters and optimizer state sharded by the
    rules on a data=2, expert=4 mesh, lowered for TPU from a CPU-only machine."""
    mesh = sharding.make_mesh("data=2,expert=4")
    model = nnx.eval_shape(lambda: moejax.Transformer(tiny(ep_exchange=exchange),
                                                      rngs=nnx.Rngs(0)))
    optimizer = nnx.eval_shape(lambda: nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param))
    graphdef, state = nnx.split((model, optimizer))

    def train_step(state, tokens_BS):
        model, optimizer = nnx.merge(graphdef, state)
        (loss, _), grads = nnx.value_and_grad(lm_loss, has_aux=True)(model, tokens_BS)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    leaves, treedef = jax.tree.flatten(state)
    shardings = jax.tree.leaves(sharding.state_shardings(state, mesh),
                                is_leaf=lambda x: isinstance(x, NamedSharding))
    abstract_state = treedef.unflatten([jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)
                                        for v, s in zip(leaves, shardings)])
    token_sharding = NamedSharding(mesh, P(("data", "expert")))
    abstract_tokens = jax.ShapeDtypeStruct((BATCH, SEQ + 1), jnp.int32, sharding=token_sharding)
    state_sharding = treedef.unflatten(shardings)
    step = jax.jit(train_step, in_shardings=(state_sharding, token_sharding),
                   out_shardings=(state_sharding, NamedSharding(mesh, P())), donate_argnums=0)
    check = [jax.export.DisabledSafetyCheck.custom_call("ragged_all_to_all")]
    with jax.set_mesh(mesh):
        exported = jax.export.export(step, platforms=["tpu"],
                                     disabled_checks=check)(abstract_state, abstract_tokens)
    assert exported.platforms == ("tpu",) and exported.nr_devices == 8
    text = exported.mlir_module()
    collective = "ragged_all_to_all" if exchange == "ragged" else "stablehlo.all_to_all"
    assert collective in text
    # the expert weights (and their Adam moments) enter the step split over the expert axis
    signature = text[text.index("func.func public @main("):].split(") -> (")[0]
    expert_args = [arg for arg in signature.split("%arg")[1:] if "['experts']['w_gate']" in arg]
    assert len(expert_args) == 3 * 4       # weight, mu, nu for each of the 4 MoE layers
    for arg in expert_args:
        assert '#sdy.sharding<@mesh, [{"expert"}, {}, {}]>' in arg, arg


def test_scanned_layers_sharded_match_dense_reference(dense_reference):
    """The same weights stacked into scanned layer groups (stacked params carry a leading
    'layers' axis, left unsplit), run expert-parallel inside nnx.scan."""
    from moejax.layer_stack import stack_layers, unstack_layers
    (loss_ref, (logits_ref, aux_ref)), grads_ref = dense_reference
    unrolled = build(tiny(ep_exchange="all_to_all"))
    cfg = unrolled.cfg.replace(scan_layers=True)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: moejax.Transformer(cfg, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, stack_layers(nnx.to_pure_dict(nnx.state(unrolled)), cfg))
    (loss, (logits, aux)), grads = loss_and_grads(nnx.merge(graphdef, state), tokens(),
                                                  sharding.make_mesh("data=2,expert=4"))
    assert_close(loss, loss_ref)
    assert_close(logits, logits_ref)
    assert_close(aux["expert_load"], aux_ref["expert_load"])
    assert_close(unstack_layers(nnx.to_pure_dict(grads), cfg), nnx.to_pure_dict(grads_ref))
