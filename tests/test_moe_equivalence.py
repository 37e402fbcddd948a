"""Every dispatch backend equals the dense reference, in outputs and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

import moejax
from moejax import dispatch
from tests.moe_helpers import assert_close, assert_trees_close, build, inputs, loss_and_grads


@st.composite
def moe_configs(draw):
    router = draw(st.sampled_from(["softmax", "sigmoid"]))
    num_experts = draw(st.sampled_from([1, 4, 8, 16]))
    n_group, topk_group = 1, 1
    if num_experts >= 4 and draw(st.booleans()):
        n_group = draw(st.sampled_from([g for g in (2, 4) if num_experts % g == 0]))
        topk_group = draw(st.integers(1, n_group))
    top_k = draw(st.integers(1, min(4, topk_group * num_experts // n_group)))
    shared = draw(st.sampled_from([0, 0, 1, 2]))
    return moejax.MoEConfig(
        d_model=draw(st.sampled_from([8, 16])), d_ff=draw(st.sampled_from([8, 24])),
        num_experts=num_experts, top_k=top_k, router=router, n_group=n_group,
        topk_group=topk_group, norm_topk_prob=draw(st.booleans()),
        routed_scaling_factor=draw(st.sampled_from([1.0, 2.5])), num_shared_experts=shared,
        shared_expert_gate=bool(shared) and draw(st.booleans()),
        aux_loss_type=draw(st.sampled_from(["batch", "sequence"])))


def _compare_with_dense(cfg, backend, seed, collapse, batch=2, seq=7, **backend_changes):
    x = inputs(cfg, batch, seq, seed, positive=collapse)
    cotangent = jax.random.normal(jax.random.key(seed + 1), x.shape)
    want_y, want_aux, want_grads = loss_and_grads(build(cfg.replace(dispatch="dense"), seed, collapse), x, cotangent)
    got_y, got_aux, got_grads = loss_and_grads(
        build(cfg.replace(dispatch=backend, **backend_changes), seed, collapse), x, cotangent)
    assert_close(got_y, want_y, what="output")
    assert_trees_close(got_grads, want_grads, what="grad")
    for key in ("aux_loss", "z_loss", "expert_load"):
        assert_close(got_aux[key], want_aux[key], what=key)
    return got_aux


@pytest.mark.parametrize("backend", ["ragged", "capacity"])
@given(cfg=moe_configs(), seed=st.integers(0, 1000), collapse=st.booleans())
@settings(max_examples=8)
def test_backend_equals_dense(backend, cfg, seed, collapse):
    # capacity with a factor large enough for every pair is dropless.
    changes = dict(capacity_factor=float(cfg.num_experts)) if backend == "capacity" else {}
    aux = _compare_with_dense(cfg, backend, seed, collapse, **changes)
    assert float(aux["dropped_fraction"]) == 0.0


def test_auto_backend_equals_dense():
    """'auto' (dropless) picks its grouped-matmul kernel per lowering platform
    (lax.platform_dependent); on CPU it must still be the dense function, gradients too."""
    cfg = moejax.MoEConfig(d_model=16, d_ff=24, num_experts=8, top_k=2, num_shared_experts=1)
    aux = _compare_with_dense(cfg, "auto", seed=3, collapse=False)
    assert float(aux["dropped_fraction"]) == 0.0


@given(cfg=moe_configs(), seed=st.integers(0, 1000), collapse=st.booleans())
@settings(max_examples=4)
def test_gmm_backend_equals_dense(cfg, seed, collapse):
    _compare_with_dense(cfg, "gmm", seed, collapse, batch=1, seq=5)


def test_all_tokens_on_one_expert_leaves_the_others_empty():
    cfg = moejax.MoEConfig(d_model=8, d_ff=16, num_experts=8, top_k=1)
    layer = build(cfg.replace(dispatch="ragged"), collapse=True)
    _, aux = layer(inputs(cfg, 2, 5, 0, positive=True))
    np.testing.assert_array_equal(np.asarray(aux["expert_load"]), [1.0] + [0.0] * 7)
    _compare_with_dense(cfg, "ragged", 0, collapse=True)


def _brute_force_drops(experts_TK, num_experts, capacity):
    """Slot-major queueing: keep[t, k] per the documented priority."""
    counts = np.zeros(num_experts, int)
    keep = np.zeros(experts_TK.shape, bool)
    for k in range(experts_TK.shape[1]):
        for t in range(experts_TK.shape[0]):
            e = experts_TK[t, k]
            if counts[e] < capacity:
                counts[e] += 1
                keep[t, k] = True
    return keep


@given(seed=st.integers(0, 1000), factor=st.sampled_from([0.25, 0.5, 1.0, 1.25]),
       top_k=st.integers(1, 3), collapse=st.booleans())
@settings(max_examples=15)
def test_capacity_drops_exactly_the_overflow(seed, factor, top_k, collapse):
    cfg = moejax.MoEConfig(d_model=8, d_ff=16, num_experts=4, top_k=top_k,
                           dispatch="capacity", capacity_factor=factor)
    layer = build(cfg, seed, collapse)
    x = inputs(cfg, 2, 9, seed, positive=collapse)
    y, aux = layer(x)

    x_TD = x.reshape(-1, cfg.d_model)
    gates_TK, experts_TK, _ = layer.router(x_TD)
    capacity = dispatch.expert_capacity(x_TD.shape[0], top_k, 4, factor)
    keep = _brute_force_drops(np.asarray(experts_TK), 4, capacity)
    assert float(aux["dropped_fraction"]) == pytest.approx(1.0 - keep.mean(), abs=1e-7)

    # The kept pairs give exactly the dense result with the dropped gates zeroed.
    want, _ = dispatch.dense_dispatch(x_TD, jnp.where(keep, gates_TK, 0.0), experts_TK,
                                      layer.experts.weights())
    assert_close(y.reshape(-1, cfg.d_model), want, what="capacity output")


def test_capacity_keeps_a_non_finite_token_to_itself():
    """A token whose expert output is inf (float16 overflow, a bad input) must not turn
    other tokens' outputs NaN: dropped pairs used to read the last buffer row (another
    token's output) and zero it with the gate, and 0 * inf is NaN. The dense reference
    with the rule's dropped gates zeroed is NaN in that token's row only."""
    cfg = moejax.MoEConfig(d_model=8, d_ff=16, num_experts=4, top_k=2)
    rng = np.random.default_rng(0)
    # every token's first choice is expert 3, which overflows; second choices vary
    experts_TK = np.stack([np.full(12, 3), rng.integers(0, 3, 12)], axis=1)
    gates_TK = jnp.asarray(rng.uniform(0.1, 1.0, (12, 2)), jnp.float32)
    capacity = dispatch.expert_capacity(12, 2, 4, 0.5)
    keep = _brute_force_drops(experts_TK, 4, capacity)
    assert not keep.all()                              # the test does drop
    bad = capacity - 1   # its first choice fills the last buffer row (expert 3's last slot)
    x_TD = inputs(cfg, 1, 12, 0).reshape(-1, cfg.d_model).at[bad].set(jnp.inf)
    experts = build(cfg).experts.weights()
    run = jax.jit(dispatch.dispatch_experts, static_argnums=0, static_argnames="capacity_factor")
    y, _ = run("capacity", x_TD, gates_TK, experts_TK, experts, capacity_factor=0.5)
    want, _ = run("dense", x_TD, jnp.where(keep, gates_TK, 0.0), experts_TK, experts)
    others = np.arange(12) != bad
    assert np.isfinite(np.asarray(want)[others]).all()
    assert_close(np.asarray(y)[others], np.asarray(want)[others], what="other tokens")


def test_huge_capacity_factor_is_capped_at_the_token_count():
    """No expert can get more than T pairs (a token's experts are distinct): cf=1e6 on 10
    tokens used to size [E, 2.5e6, D] buffers (640 MB of temporaries for 10 tokens).
    test_backend_equals_dense runs capacity at cf=E, where the cap applies, against dense."""
    assert dispatch.expert_capacity(10, 2, 4, 1e6) == 10
    assert dispatch.expert_capacity(10, 2, 4, 1e-6) == 1
    cfg = moejax.MoEConfig(d_model=8, d_ff=16, num_experts=4, top_k=2)
    graphdef, state = nnx.split(build(cfg.replace(dispatch="capacity", capacity_factor=1e6)))
    forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x)[0])
    compiled = forward.lower(state, inputs(cfg, 2, 5, 0)).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < 2**20


def test_auto_backend_resolution():
    assert dispatch.resolve_backend("auto", 1.0) == "capacity"
    assert dispatch.resolve_backend("auto", None) == "auto"  # kernel chosen per lowering platform
    assert dispatch.GMM_BACKENDS["auto"] == "auto"
    assert dispatch.resolve_backend("dense", None) == "dense"
