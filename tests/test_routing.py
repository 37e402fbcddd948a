"""Routers and losses against brute-force numpy (float64) implementations."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, strategies as st

import moejax
from moejax import routing


def _np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _np_route(logits, bias, cfg):
    """Per-token brute force of the documented router algorithm."""
    scores = _np_softmax(logits) if cfg.router == "softmax" else 1 / (1 + np.exp(-logits))
    choice = scores + (bias if cfg.router == "sigmoid" else 0.0)
    num_experts = logits.shape[-1]
    per_group = num_experts // cfg.n_group
    gates, experts = [], []
    for t in range(logits.shape[0]):
        allowed = np.ones(num_experts, bool)
        if cfg.n_group > 1:
            groups = choice[t].reshape(cfg.n_group, per_group)
            group_score = np.sort(groups, axis=-1)[:, ::-1][:, :min(2, per_group)].sum(-1)
            keep = np.argsort(-group_score, kind="stable")[:cfg.topk_group]
            allowed = np.repeat(np.isin(np.arange(cfg.n_group), keep), per_group)
        masked = np.where(allowed, choice[t], -np.inf)
        top = np.argsort(-masked, kind="stable")[:cfg.top_k]
        g = scores[t, top]
        if cfg.norm_topk_prob:
            g = g / g.sum()
        gates.append(g * cfg.routed_scaling_factor)
        experts.append(top)
    return np.array(gates), np.array(experts)


@given(router=st.sampled_from(["softmax", "sigmoid"]), groups=st.sampled_from([(1, 1), (4, 2), (4, 1), (8, 3)]),
       top_k=st.integers(1, 4), norm=st.booleans(), scale=st.sampled_from([1.0, 2.5]),
       seed=st.integers(0, 2**16))
def test_router_matches_brute_force(router, groups, top_k, norm, scale, seed):
    n_group, topk_group = groups
    per_group = 16 // n_group
    top_k = min(top_k, topk_group * per_group)
    cfg = moejax.MoEConfig(d_model=8, d_ff=8, num_experts=16, top_k=top_k, router=router,
                           n_group=n_group, topk_group=topk_group, norm_topk_prob=norm,
                           routed_scaling_factor=scale)
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(12, 16)).astype(np.float32)
    bias = rng.normal(scale=0.3, size=(16,)).astype(np.float32)
    common = dict(norm_topk_prob=norm, n_group=n_group, topk_group=topk_group,
                  routed_scaling_factor=scale)
    if router == "softmax":
        gates, experts, _ = routing.softmax_topk(jnp.asarray(logits), top_k, **common)
    else:
        gates, experts, _ = routing.sigmoid_topk(jnp.asarray(logits), jnp.asarray(bias), top_k, **common)
    want_gates, want_experts = _np_route(logits.astype(np.float64), bias.astype(np.float64), cfg)
    np.testing.assert_array_equal(np.sort(experts, -1), np.sort(want_experts, -1))
    order, want_order = np.argsort(experts, -1), np.argsort(want_experts, -1)
    np.testing.assert_allclose(np.take_along_axis(np.asarray(gates), order, -1),
                               np.take_along_axis(want_gates, want_order, -1), rtol=1e-5, atol=1e-7)


def test_sigmoid_bias_steers_selection_but_not_gates():
    logits = jnp.array([[0.0, 0.1, 0.2, 0.3]])
    bias = jnp.array([5.0, 0.0, 0.0, 0.0])  # pulls expert 0 in although its score is lowest
    gates, experts, _ = routing.sigmoid_topk(logits, bias, 2, norm_topk_prob=False)
    assert set(np.asarray(experts[0]).tolist()) == {0, 3}
    np.testing.assert_allclose(np.sort(gates[0]), np.sort(jax.nn.sigmoid(jnp.array([0.0, 0.3]))), rtol=1e-6)


def test_group_mask_uses_minus_inf_and_top2_sum():
    # group 0 = [0.9, 0.0], group 1 = [0.6, 0.6]: by max group 0 wins, by top-2 sum group 1.
    scores = jnp.array([[0.9, 0.0, 0.6, 0.6]])
    masked = routing.group_limited_mask(scores, n_group=2, topk_group=1)
    np.testing.assert_array_equal(np.asarray(masked), np.array([[-np.inf, -np.inf, 0.6, 0.6]], np.float32))


def test_balance_loss_and_z_loss_match_formulas():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2 * 6, 4))
    probs = _np_softmax(logits)
    experts = np.argsort(-probs, -1)[:, :2]
    f = np.bincount(experts.ravel(), minlength=4) / experts.size
    want = 4 * np.sum(f * probs.mean(0))
    got = routing.load_balance_loss(jnp.asarray(probs, jnp.float32), jnp.asarray(experts))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    per_seq = []
    for s in range(2):
        p, e = probs[s * 6:(s + 1) * 6], experts[s * 6:(s + 1) * 6]
        per_seq.append(4 * np.sum(np.bincount(e.ravel(), minlength=4) / e.size * p.mean(0)))
    got_seq = routing.load_balance_loss(jnp.asarray(probs, jnp.float32), jnp.asarray(experts), 2)
    np.testing.assert_allclose(got_seq, np.mean(per_seq), rtol=1e-6)
    lse = np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(routing.z_loss(jnp.asarray(logits, jnp.float32)), np.mean(lse ** 2), rtol=1e-6)


def test_bias_update_moves_toward_balance():
    bias = jnp.zeros(4)
    load = jnp.array([0.7, 0.1, 0.1, 0.1])
    new = routing.update_router_bias(bias, load, 0.01)
    np.testing.assert_allclose(new, [-0.01, 0.01, 0.01, 0.01])


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_router_math_is_float32_for_bfloat16_inputs(router):
    cfg = moejax.MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=2, router=router)
    r = routing.Router(cfg, rngs=nnx.Rngs(0))
    gates, _, stats = r(jnp.ones((3, 8), jnp.bfloat16))
    assert gates.dtype == jnp.float32
    assert all(v.dtype == jnp.float32 for v in stats.values())


def test_expert_fraction_counts_every_assignment():
    experts = jnp.array(list(itertools.product(range(3), repeat=2)))
    np.testing.assert_allclose(routing.expert_fraction(experts, 4), [1 / 3, 1 / 3, 1 / 3, 0.0])


@pytest.mark.parametrize("call, message", [
    (lambda s: routing.group_limited_mask(s, 3, 1), "n_group=3"),
    (lambda s: routing.group_limited_mask(s, 4, 0), "topk_group=0"),
    (lambda s: routing.group_limited_mask(s, 4, 5), "topk_group=5"),
    (lambda s: routing.softmax_topk(s, 9, norm_topk_prob=True), "top_k=9"),
    # 1 group of 2 experts holds fewer than 4: top_k used to pick masked (-inf) experts
    (lambda s: routing.softmax_topk(s, 4, norm_topk_prob=True, n_group=4, topk_group=1), "top_k=4"),
    (lambda s: routing.sigmoid_topk(s, jnp.zeros(8), 3, norm_topk_prob=True, n_group=4,
                                    topk_group=1), "top_k=3"),
    (lambda s: routing.load_balance_loss(jax.nn.softmax(s), jnp.zeros((3, 2), jnp.int32), 2),
     "num_sequences=2"),
])
def test_public_routing_functions_refuse_what_moe_config_refuses(call, message):
    """Called without a config, the functions check the config's rules themselves
    (a silent wrong routing or a reshape/top_k error from deep inside before)."""
    scores = jnp.asarray(np.random.default_rng(0).normal(size=(3, 8)), jnp.float32)
    with pytest.raises(ValueError, match=message):
        call(scores)


def test_expert_fraction_counts_past_float32_integers():
    """One expert with more than 2**24 pairs (one collapsed expert, a large batch): a
    float32 count stalled at 2**24 and under-reported its load and balance loss."""
    pairs, minority = 2**24 + 2**22, 2**20
    experts = jnp.zeros((pairs, 1), jnp.int32).at[:minority].set(1)
    got = jax.jit(routing.expert_fraction, static_argnums=1)(experts, 2)
    np.testing.assert_allclose(got, [(pairs - minority) / pairs, minority / pairs], rtol=1e-7)
