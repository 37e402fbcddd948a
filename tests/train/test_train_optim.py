"""The optimizer: schedule, decoupled weight decay on matrices only, parameter groups."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train.config import TrainConfig, TrainError
from train.optim import lr_schedule, make_optimizer


def test_warmup_cosine_schedule_matches_formula():
    cfg = TrainConfig(lr=2e-3, warmup_steps=10, steps=110, min_lr_ratio=0.1)
    schedule = lr_schedule(cfg)
    for step in (0, 5, 10, 37, 60, 109, 110):
        if step < 10:
            want = 2e-3 * step / 10
        else:
            want = 2e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 10) / 100)))
        assert float(schedule(step)) == pytest.approx(want, rel=1e-5, abs=1e-12)


PARAMS = {"w": jnp.full((2, 3), 2.0), "norm": {"scale": jnp.full((3,), 2.0)},
          "memory": {"values": jnp.full((4, 3), 2.0)}}
CONSTANT = dict(lr=0.1, warmup_steps=0, steps=10, min_lr_ratio=1.0, clip_norm=0.0)


def one_update(cfg, grads):
    tx = make_optimizer(cfg, PARAMS)
    updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
    return jax.tree.map(np.asarray, updates)


def test_weight_decay_only_on_matrices():
    zeros = jax.tree.map(jnp.zeros_like, PARAMS)
    updates = one_update(TrainConfig(weight_decay=0.5, **CONSTANT), zeros)
    # Adam's step is 0 for a zero gradient; what is left is -lr * wd * p on matrices
    np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * 2.0, rtol=1e-6)
    np.testing.assert_allclose(updates["memory"]["values"], -0.1 * 0.5 * 2.0, rtol=1e-6)
    np.testing.assert_array_equal(updates["norm"]["scale"], 0.0)


def test_weight_decay_skips_norm_scales_of_scanned_layers():
    """Scanned layers stack every parameter on a leading layer axis: a stacked norm
    scale [L, D] is still a vector per layer, a stacked matrix [L, D, F] a matrix."""
    params = {"stacks": {0: {"block": {"attn_norm": {"scale": jnp.full((2, 3), 2.0)},
                                       "w": jnp.full((2, 3, 4), 2.0)}}}}
    tx = make_optimizer(TrainConfig(weight_decay=0.5, **CONSTANT), params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    block = updates["stacks"][0]["block"]
    np.testing.assert_array_equal(block["attn_norm"]["scale"], 0.0)
    np.testing.assert_allclose(block["w"], -0.1 * 0.5 * 2.0, rtol=1e-6)


def test_param_group_scales_its_updates_only():
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.3), PARAMS)
    base = one_update(TrainConfig(weight_decay=0.5, **CONSTANT), grads)
    grouped = one_update(TrainConfig(weight_decay=0.5, param_groups=("memory.*values=10",),
                                     **CONSTANT), grads)
    # first Adam step: g / (|g| + eps) = 1 (bias-corrected), so the update is -lr * (1 + wd * p)
    np.testing.assert_allclose(base["memory"]["values"], -0.1 * (1 + 0.5 * 2.0), rtol=1e-5)
    np.testing.assert_allclose(grouped["memory"]["values"], 10 * base["memory"]["values"], rtol=1e-6)
    np.testing.assert_array_equal(grouped["w"], base["w"])
    np.testing.assert_array_equal(grouped["norm"]["scale"], base["norm"]["scale"])


@pytest.mark.parametrize("rule,needle", [("values", "REGEX=LR_MULT"), ("([=2", "not a regular expression"),
                                         ("w=inf", "finite LR_MULT"), ("w=nan", "finite LR_MULT"),
                                         ("nothing_like_this=2", "matches no parameter")])
def test_bad_param_groups(rule, needle):
    with pytest.raises(TrainError, match=needle):
        make_optimizer(TrainConfig(param_groups=(rule,)), PARAMS)


@pytest.mark.parametrize("rule", ["values", "=2", "([=2", "w=inf", "w=-1", "w=abc"])
def test_param_group_syntax_is_checked_with_the_other_flags(rule):
    """A malformed --param-group fails with the flags, before jax is imported and the
    model is built (it used to fail only once the optimizer was made)."""
    with pytest.raises(TrainError, match="expected REGEX=LR_MULT"):
        TrainConfig(param_groups=(rule,))


@pytest.mark.parametrize("mesh", ["data=two", "expret=8", "data=2,data=2", "data=0", ""])
def test_mesh_syntax_is_checked_with_the_other_flags(mesh):
    """A malformed --mesh fails with the flags, before jax is imported (it used to fail
    only once jax was imported and the devices listed, ~10 s later)."""
    with pytest.raises(TrainError, match="--mesh: "):
        TrainConfig(mesh=mesh)


def test_memory_values_get_their_own_lr_and_no_weight_decay_by_default():
    params = {"w": jnp.full((2, 3), 2.0), "ffn": {"values": {"mem_values": jnp.full((4, 3), 2.0)}}}
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.3), params)

    def update(cfg):
        tx = make_optimizer(cfg, params)
        return jax.tree.map(np.asarray, tx.update(grads, tx.init(params), params)[0])

    default = update(TrainConfig(weight_decay=0.5, **CONSTANT))
    # first Adam step is 1 (bias-corrected): matrices -lr * (1 + wd * p), values -10 lr without decay
    np.testing.assert_allclose(default["w"], -0.1 * (1 + 0.5 * 2.0), rtol=1e-5)
    np.testing.assert_allclose(default["ffn"]["values"]["mem_values"], -0.1 * 10, rtol=1e-5)
    plain = update(TrainConfig(weight_decay=0.5, memory_lr_mult=1.0, **CONSTANT))
    np.testing.assert_allclose(plain["ffn"]["values"]["mem_values"], -0.1, rtol=1e-5)
    ruled = update(TrainConfig(weight_decay=0.5, param_groups=("mem_values=3",), **CONSTANT))
    np.testing.assert_allclose(ruled["ffn"]["values"]["mem_values"], -0.1 * 3, rtol=1e-5)
    with pytest.raises(TrainError, match="memory-lr-mult"):
        TrainConfig(memory_lr_mult=-1.0)


def test_optimizer_state_layout_does_not_depend_on_the_flags():
    """A checkpoint's optimizer state is restored by tree path: flags a resumed run may
    change (clip norm, weight decay, groups, betas) must not move or add any leaf."""
    params = {"w": jnp.full((2, 3), 2.0), "ffn": {"values": {"mem_values": jnp.full((4, 3), 2.0)}}}

    def leaf_paths(**flags):
        tx = make_optimizer(TrainConfig(**flags), params)
        leaves = jax.tree_util.tree_flatten_with_path(jax.eval_shape(tx.init, params))[0]
        return [(jax.tree_util.keystr(path), leaf.shape) for path, leaf in leaves]

    reference = leaf_paths()
    for flags in (dict(clip_norm=0.0), dict(weight_decay=0.0), dict(param_groups=("w=0.5",)),
                  dict(memory_lr_mult=1.0), dict(beta1=0.0, warmup_steps=0)):
        assert leaf_paths(**flags) == reference, flags
