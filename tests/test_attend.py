"""attend(): the XLA reference against float64 brute force, NaN-safe masking, and the
kernels each platform lowers to (jax.export from this CPU host, as for the gmm kernels)."""

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import attend as attend_lib
from moejax.attend import Mask, attend

S_ = jax.ShapeDtypeStruct
CUDNN_CALLS = ("__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward")


def brute_force(q, k, v, mask, scale):
    """float64, one (batch, head, query) at a time."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, s, h, _ = q.shape
    r = h // k.shape[2]
    out = np.zeros((b, s, h, v.shape[-1]))
    for bi in range(b):
        for hi in range(h):
            for si in range(s):
                seen = np.asarray(mask)[bi, si]
                if not seen.any():
                    continue
                scores = k[bi][seen, hi // r] @ q[bi, si, hi] * scale
                p = np.exp(scores - scores.max())
                out[bi, si, hi] = (p / p.sum()) @ v[bi][seen, hi // r]
    return out


def _qkv(b=2, s=5, t=7, h=4, g=2, k=6, v=3, seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.normal(size=(b, s, h, k)), jnp.float32),
            jnp.asarray(rng.normal(size=(b, t, g, k)), jnp.float32),
            jnp.asarray(rng.normal(size=(b, t, g, v)), jnp.float32))


def test_reference_matches_brute_force_for_a_cache_mask():
    q, k, v = _qkv()
    # rows at different lengths: queries at 2..6 and 0..4, slots past the length empty
    q_pos = jnp.asarray([[2, 3, 4, 5, 6], [0, 1, 2, 3, 4]], jnp.int32)
    kv_pos = jnp.asarray([[0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, -1, -1]], jnp.int32)
    mask = Mask(q_pos, kv_pos)
    got = attend(q, k, v, mask, scale=0.3)
    np.testing.assert_allclose(got, brute_force(q, k, v, mask.dense(), 0.3), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got, attend(q, k, v, mask.dense(), scale=0.3, impl="xla"))


def test_causal_mask_matches_brute_force():
    q, k, v = _qkv(s=7)
    pos = jnp.broadcast_to(jnp.arange(7, dtype=jnp.int32), (2, 7))
    got = jax.jit(lambda *a: attend(*a, Mask.causal(pos), scale=0.5))(q, k, v)
    np.testing.assert_allclose(got, brute_force(q, k, v, Mask.causal(pos).dense(), 0.5),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("where", ["k", "v"])
def test_non_finite_key_rows_reach_only_the_queries_that_see_them(where):
    q, k, v = _qkv(s=7)
    pos = jnp.broadcast_to(jnp.arange(7, dtype=jnp.int32), (2, 7))
    clean = attend(q, k, v, Mask.causal(pos), scale=0.5)
    bad = {"k": k, "v": v}
    bad[where] = bad[where].at[0, 4, 1, 0].set(jnp.nan).at[1, 6, 0, 0].set(jnp.inf)
    got = np.asarray(attend(q, bad["k"], bad["v"], Mask.causal(pos), scale=0.5))
    # row 0: queries 0..3 never see key 4; row 1: queries 0..5 never see key 6
    np.testing.assert_array_equal(got[0, :4], clean[0, :4])
    np.testing.assert_array_equal(got[1, :6], clean[1, :6])
    assert np.isnan(got[0, 4:]).all() and np.isnan(got[1, 6:]).all()
    # the same through a dense mask (the cache path)
    dense = np.asarray(attend(q, bad["k"], bad["v"], Mask.causal(pos).dense(), scale=0.5))
    np.testing.assert_array_equal(dense[0, :4], clean[0, :4])
    assert np.isnan(dense[0, 4:]).all()


def _export(fn, platform, *args):
    checks = [jax.export.DisabledSafetyCheck.custom_call(c) for c in CUDNN_CALLS]
    return jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*args).mlir_module()


def _causal_attend(impl="auto"):
    def fn(q, k, v):
        pos = jnp.broadcast_to(jnp.arange(q.shape[1], dtype=jnp.int32), q.shape[:2])
        return attend(q, k, v, Mask.causal(pos), scale=0.125, impl=impl)
    return fn


def _loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) ** 2)


@pytest.mark.parametrize("v_dim", [64, 48])   # 48: MLA's narrower values (zero-padded for the kernel)
def test_auto_lowers_to_the_tpu_flash_kernel(v_dim):
    args = (S_((2, 256, 4, 64), jnp.float32), S_((2, 256, 2, 64), jnp.float32),
            S_((2, 256, 2, v_dim), jnp.float32))
    assert "tpu_custom_call" in _export(_causal_attend(), "tpu", *args)
    grad = _export(jax.grad(_loss(_causal_attend()), argnums=(0, 1, 2)), "tpu", *args)
    assert grad.count("custom_call @tpu_custom_call") >= 3   # forward, dkv, dq kernels


def test_flash_falls_back_to_xla_for_a_length_it_cannot_block_and_says_why(caplog):
    args = (S_((1, 200, 2, 64), jnp.float32),) * 3     # 200 = 128 + 72: no whole blocks
    with caplog.at_level(logging.INFO, logger="moejax.attend"):
        attend_lib._reported.clear()
        module = _export(_causal_attend(), "tpu", *args)
    assert "tpu_custom_call" not in module
    assert "length 200 is not a multiple of 128" in caplog.text


@pytest.fixture
def pretend_cudnn(monkeypatch):
    """cuDNN is not installed on this CPU host: let the cudnn path trace as on a GPU host."""
    from jax._src.cudnn import fused_attention_stablehlo as fa
    monkeypatch.setattr(attend_lib, "cudnn_available", lambda: True)
    monkeypatch.setattr(fa, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(fa, "check_compute_capability", lambda capability: True)
    monkeypatch.setattr(fa, "is_cuda_compute_capability_equal", lambda capability: False)


def test_auto_lowers_to_cudnn_on_cuda(pretend_cudnn):
    args = (S_((2, 128, 4, 64), jnp.bfloat16), S_((2, 128, 2, 64), jnp.bfloat16),
            S_((2, 128, 2, 64), jnp.bfloat16))
    calls = set(re.findall(r"custom_call @(\S+?)\(", _export(
        jax.grad(_loss(_causal_attend()), argnums=(0, 1, 2)), "cuda", *args)))
    assert set(CUDNN_CALLS) <= calls
    # float32 is not a cuDNN flash-attention dtype: the reference runs there
    f32 = tuple(S_(a.shape, jnp.float32) for a in args)
    assert "custom_call @__cudnn" not in _export(_causal_attend(), "cuda", *f32)


def test_short_sequences_differentiate_on_cpu_with_every_branch_traced():
    """platform_dependent traces the TPU branch's backward too: it must trace at any length."""
    q, k, v = _qkv(s=8, t=8)
    grads = jax.jit(jax.grad(_loss(_causal_attend()), argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(_loss(_causal_attend("xla")), argnums=(0, 1, 2)))(q, k, v)
    jax.tree.map(np.testing.assert_array_equal, grads, want)


def test_auto_on_cpu_is_the_reference():
    q, k, v = _qkv(s=7, t=7)
    np.testing.assert_array_equal(jax.jit(_causal_attend("auto"))(q, k, v),
                                  jax.jit(_causal_attend("xla"))(q, k, v))
    with pytest.raises(ValueError, match="impl must be one of"):
        _causal_attend("splash")(q, k, v)
