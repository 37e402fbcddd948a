"""The pure train step: loss, router-bias update, and the non-finite guard.

A micro model with DeepSeek-style sigmoid routing (so it has a RouterBias
updated outside the optimizer); one jitted step is compiled and reused.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moejax
from train.config import TrainConfig
from train.optim import make_optimizer
from train.step import lm_loss, merge_model, split_model, train_step_fn

RATE = 0.01


@pytest.fixture(scope="module")
def setup():
    moe = moejax.MoEConfig(d_model=16, d_ff=16, num_experts=4, top_k=2, router="sigmoid",
                           bias_update_rate=RATE, aux_loss_coef=0.01)
    cfg = moejax.ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                             d_ff=32, moe=moe)
    graphdef, params, nonparam = split_model(moejax.Transformer(cfg, rngs=nnx.Rngs(0)))
    tx = make_optimizer(TrainConfig(lr=1e-2, warmup_steps=0, steps=10), params)
    step = jax.jit(train_step_fn(graphdef, tx))
    batch = jnp.asarray(np.random.default_rng(0).integers(0, 64, (4, 9)), jnp.int32)
    return graphdef, params, nonparam, tx, step, batch


def test_lm_loss_is_cross_entropy():
    logits = np.random.default_rng(1).normal(size=(2, 3, 7))
    targets = np.array([[0, 6, 3], [2, 2, 5]])
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = -np.take_along_axis(logp, targets[..., None], -1).mean()
    np.testing.assert_allclose(float(lm_loss(jnp.asarray(logits, jnp.float32), targets)), want,
                               rtol=1e-6)


def test_step_optimizes_params_only_and_updates_router_bias(setup):
    graphdef, params, nonparam, tx, step, batch = setup
    assert "bias" not in str(jax.tree_util.tree_structure(params))  # optimizer never sees it
    new_params, opt_state, new_nonparam, m = step(params, tx.init(params), nonparam, batch)
    assert bool(m["finite"])
    np.testing.assert_allclose(float(m["total_loss"]), float(m["loss"] + m["router_loss"]), rtol=1e-6)
    logits = jax.jit(lambda p, n, x: merge_model(graphdef, p, n)(x)[0])(params, nonparam, batch[:, :-1])
    np.testing.assert_allclose(float(m["loss"]), float(lm_loss(logits, batch[:, 1:])), rtol=1e-6)

    load = np.asarray(m["expert_load"][0], np.float64)
    old_bias = np.asarray(nonparam["layers"][0]["ffn"]["router"]["bias"])
    want = old_bias + RATE * np.sign(load.mean() - load)  # aux-loss-free balancing
    np.testing.assert_allclose(new_nonparam["layers"][0]["ffn"]["router"]["bias"], want, rtol=1e-6)
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), new_params, params)
    assert all(jax.tree.leaves(changed))


def test_non_finite_step_keeps_every_state(setup):
    _, params, nonparam, tx, step, batch = setup
    opt_state = tx.init(params)
    bad = {**params, "lm_head": params["lm_head"].at[0, 0].set(jnp.inf)}
    new_params, new_opt, new_nonparam, m = step(bad, opt_state, nonparam, batch)
    assert not bool(m["finite"])
    for new, old in ((new_params, bad), (new_opt, opt_state), (new_nonparam, nonparam)):
        for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(old)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_step_whose_update_is_not_finite_keeps_every_state(setup):
    """Finite loss and gradients, non-finite update (here a first moment at inf; from the
    command line --lr 1e39, finite in Python but inf in float32, where inf * 0 = NaN). The
    step used to pass as finite, so its NaN parameters reached a checkpoint reported as
    the last good one."""
    _, params, nonparam, tx, step, batch = setup
    opt_state = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.full_like(x, jnp.inf) if "mu" in jax.tree_util.keystr(path) else x,
        tx.init(params))
    new_params, new_opt, new_nonparam, m = step(params, opt_state, nonparam, batch)
    assert np.isfinite(float(m["total_loss"])) and np.isfinite(float(m["grad_norm"]))
    assert not bool(m["finite"]) and not bool(m["params_finite"])
    for new, old in ((new_params, params), (new_opt, opt_state), (new_nonparam, nonparam)):
        for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(old)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bfloat16_compute_keeps_float32_state(setup):
    """--dtype bfloat16: same step, bf16 matmuls; parameters and Adam moments stay float32."""
    graphdef, params, nonparam, tx, step, batch = setup
    model = merge_model(graphdef, params, nonparam)
    bf16_cfg = model.cfg.with_compute_dtype("bfloat16")
    bf16_graphdef, bf16_params, bf16_nonparam = split_model(moejax.Transformer(bf16_cfg, rngs=nnx.Rngs(0)))
    for a, b in zip(jax.tree.leaves(bf16_params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)  # same float32 parameters, only compute differs
    bf16_step = jax.jit(train_step_fn(bf16_graphdef, tx))
    new_params, new_opt, _, m = bf16_step(bf16_params, tx.init(bf16_params), bf16_nonparam, batch)
    _, _, _, ref = step(params, tx.init(params), nonparam, batch)
    assert {str(x.dtype) for x in jax.tree.leaves((new_params, new_opt))} == {"float32", "int32"}
    # bf16 keeps 8 mantissa bits (eps 2^-8 ~ 0.4%); a few roundings through one block
    np.testing.assert_allclose(float(m["loss"]), float(ref["loss"]), rtol=2e-2)


def test_active_parameter_count_reads_memory_rows_not_tables():
    """The banner's active count: top_k of the routed experts and, of a memory value table,
    the rows one token reads (it counted whole tables, 3x the truth for tiny-mem)."""
    from train.state import parameter_counts
    mem = moejax.MemoryConfig(num_slots=64, top_k=2, num_heads=2, d_key=8, ngram_heads=2,
                              ngram_table_rows=64, ngram_d_row=4)
    moe = moejax.MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=1)
    cfg = moejax.ModelConfig(vocab_size=32, d_model=8, n_layers=3, n_heads=2, n_kv_heads=1, d_ff=16,
                             moe=moe, memory=mem, ffn_kinds=("pkm", "engram", "moe"))
    params = split_model(nnx.eval_shape(lambda: moejax.Transformer(cfg, rngs=nnx.Rngs(0))))[1]
    flat = {"/".join(str(k.key) for k in path): leaf.size
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    pkm, engram = flat["layers/0/ffn/values/mem_values"], flat["layers/1/ffn/mem_values"]
    experts = sum(size for name, size in flat.items() if "/experts/" in name)
    total = sum(flat.values())
    want = total - pkm - engram - experts * 3 // 4 + (2 * 2) * 8 + (2 * 2) * 4  # rows read x width
    assert parameter_counts(cfg, params) == (total, want)
