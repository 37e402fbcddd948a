"""Experts objects: int8 experts against float64 numpy (exact and within the bound the
quantization error implies), every dispatch backend and expert-parallel mesh with int8
experts against the dense reference with the same int8 experts, and quantize_experts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moejax
from moejax import sharding
from moejax.experts import Int8Experts, RoutedExperts, dequantize

D, F, E, K = 16, 32, 8, 2
SILU_LIPSCHITZ = 1.0999  # max |silu'(x)| = 1.0998 (at x ~ 2.4)


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _numpy_quantize(w_EKN):
    """Independent per-output-channel symmetric int8 quantization in float64."""
    scale_EN = np.abs(w_EKN).max(axis=1) / 127.0
    scale_EN = np.where(scale_EN > 0, scale_EN, 1.0)
    q_EKN = np.clip(np.round(w_EKN / scale_EN[:, None, :]), -127, 127)
    return q_EKN * scale_EN[:, None, :], scale_EN


def _numpy_experts(x_MD, sizes_E, w_gate, w_up, w_down):
    """SwiGLU of each row with its group's expert, float64; also (g, u, h) for the bound."""
    expert_M = np.repeat(np.arange(len(sizes_E)), sizes_E)
    g_MF = np.einsum("md,mdf->mf", x_MD, w_gate[expert_M])
    u_MF = np.einsum("md,mdf->mf", x_MD, w_up[expert_M])
    h_MF = _silu(g_MF) * u_MF
    return np.einsum("mf,mfd->md", h_MF, w_down[expert_M]), (expert_M, g_MF, u_MF, h_MF)


def _error_bound(x_MD, parts, deq, scales):
    """|y_int8 - y_float| per element from |w_hat - w| <= scale/2 per output channel:
    gate/up errors <= sum_k |x_k| s/2; through h = silu(g) u (silu Lipschitz 1.0999)
    and then down: sum_f |dh_f| |w_hat_down| + sum_f |h_f| s_down/2."""
    expert_M, g_MF, u_MF, h_MF = parts
    abs_x = np.abs(x_MD).sum(axis=1, keepdims=True)
    eps_g = abs_x * scales["gate"][expert_M] / 2
    eps_u = abs_x * scales["up"][expert_M] / 2
    eps_h = SILU_LIPSCHITZ * eps_g * (np.abs(u_MF) + eps_u) + np.abs(_silu(g_MF)) * eps_u
    return (np.einsum("mf,mfd->md", eps_h, np.abs(deq["down"][expert_M]))
            + np.abs(h_MF).sum(axis=1, keepdims=True) * scales["down"][expert_M] / 2)


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_int8_experts_match_numpy_and_stay_within_the_quantization_bound(backend):
    cfg = moejax.MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=K)
    float_experts = RoutedExperts(cfg, rngs=nnx.Rngs(3))
    int8_experts = Int8Experts.from_float(float_experts)
    sizes_E = np.array([5, 0, 9, 1, 0, 7, 3, 6])             # empty groups included
    x_MD = np.asarray(jax.random.normal(jax.random.key(4), (int(sizes_E.sum()), D)), np.float64)
    w = {k: np.asarray(getattr(float_experts, f"w_{k}")[...], np.float64) for k in ("gate", "up", "down")}
    deq, scales = {}, {}
    for k in w:
        deq[k], scales[k] = _numpy_quantize(w[k])

    got = np.asarray(int8_experts(jnp.asarray(x_MD, jnp.float32), jnp.asarray(sizes_E, jnp.int32),
                                  backend=backend), np.float64)
    want_int8, _ = _numpy_experts(x_MD, sizes_E, deq["gate"], deq["up"], deq["down"])
    want_float, parts = _numpy_experts(x_MD, sizes_E, w["gate"], w["up"], w["down"])
    scale = np.abs(want_float).max()
    # 1. exactly the numpy quantization (float32 rounding only)
    np.testing.assert_allclose(got, want_int8, rtol=0, atol=1e-5 * scale)
    # 2. against the float experts: within the worst-case bound the quantization error implies
    bound = _error_bound(x_MD, parts, deq, scales)
    assert np.all(np.abs(got - want_float) <= bound + 1e-5 * scale)
    assert np.abs(got - want_float).max() > 1e-5 * scale  # int8 is not secretly the float path


def _layer_pair(seed=0, **changes):
    cfg = moejax.MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=K, **changes)
    ref_cfg = cfg.replace(dispatch="dense", capacity_factor=None)
    layer = moejax.quantize_experts(moejax.MoE(cfg, rngs=nnx.Rngs(seed)))
    ref = moejax.quantize_experts(moejax.MoE(ref_cfg, rngs=nnx.Rngs(seed)))
    assert isinstance(layer.experts, Int8Experts)
    return layer, ref


def _assert_close(actual, expected, rtol=1e-5):
    a, b = np.asarray(actual), np.asarray(expected)
    assert np.abs(a - b).max() <= rtol * np.abs(b).max()


X = jax.random.normal(jax.random.key(1), (4, 8, D))


@pytest.mark.parametrize("dispatch, capacity_factor", [("ragged", None), ("gmm", None),
                                                       ("capacity", float(E))])
def test_every_backend_with_int8_experts_equals_dense_int8(dispatch, capacity_factor):
    layer, ref = _layer_pair(dispatch=dispatch, capacity_factor=capacity_factor)
    y, aux = nnx.jit(lambda m, x: m(x))(layer, X)
    y_ref, _ = nnx.jit(lambda m, x: m(x))(ref, X)
    _assert_close(y, y_ref)
    assert float(aux["dropped_fraction"]) == 0.0


@pytest.mark.parametrize("mesh_spec, exchange", [("data=2,expert=4", "all_to_all"),
                                                 ("expert=8", "ragged"),
                                                 ("fsdp=2,expert=2,tensor=2", "all_to_all")])
def test_expert_parallel_with_int8_experts_equals_dense_int8(mesh_spec, exchange):
    layer, ref = _layer_pair(dispatch="ragged", ep_exchange=exchange)
    y_ref, _ = nnx.jit(lambda m, x: m(x))(ref, X)
    mesh = sharding.make_mesh(mesh_spec)
    with jax.set_mesh(mesh):
        sharding.shard_model(layer, mesh)
        y, aux = nnx.jit(lambda m, x: m(x))(layer, X)
    _assert_close(y, y_ref)
    assert float(aux["ep_overflow"]) == 0.0 and float(aux["dispatch_bytes"]) > 0


def test_quantize_experts_on_a_model_keeps_logits_close():
    cfg = moejax.ModelConfig.preset("tiny").replace(n_layers=2)
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, cfg.vocab_size)
    model = moejax.Transformer(cfg, rngs=nnx.Rngs(0))
    forward = nnx.jit(lambda m, t: m(t)[0])
    float_logits = forward(model, tokens)
    params_before = len(jax.tree.leaves(nnx.state(model, nnx.Param)))

    moejax.quantize_experts(model)
    int8_logits = forward(model, tokens)
    # the same model with float experts holding the dequantized weights
    dequantized = moejax.Transformer(cfg, rngs=nnx.Rngs(0))
    for moe, q_moe in zip(dequantized.moe_layers, model.moe_layers):
        for k in ("gate", "up", "down"):
            getattr(moe.experts, f"w_{k}")[...] = dequantize(getattr(q_moe.experts, f"q_{k}")[...],
                                                             getattr(q_moe.experts, f"s_{k}")[...])
    _assert_close(int8_logits, forward(dequantized, tokens))
    # int8 keeps ~2 significant digits per weight: logits move, but by far less than their size
    error = np.abs(np.asarray(int8_logits) - np.asarray(float_logits)).max()
    assert 0 < error < 0.02 * np.abs(np.asarray(float_logits)).max()
    # quantized weights are frozen: no longer nnx.Params (3 expert tensors per MoE layer)
    assert len(jax.tree.leaves(nnx.state(model, nnx.Param))) == params_before - 3 * cfg.num_moe_layers
