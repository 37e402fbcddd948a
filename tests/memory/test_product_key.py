"""product_key_topk against a brute-force top-k over all n * n slots; gradients against
central finite differences in float64; the ProductKeyMemory layer against a plain-jnp
re-implementation of its five steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.config import MemoryConfig
from moejax.memory import ProductKeyMemory, MemoryValues, product_key_topk
from moejax.memory.product_key import topk_from_halves


@jax.jit
def _pair_scores(q_TK, k1_nK, k2_nK):
    half = k1_nK.shape[1]
    s1_Tn = jnp.einsum("tk,nk->tn", q_TK[:, :half], k1_nK)
    s2_Tn = jnp.einsum("tk,nk->tn", q_TK[:, half:], k2_nK)
    return (s1_Tn[:, :, None] + s2_Tn[:, None, :]).reshape(q_TK.shape[0], -1)


def brute_force(q_TK, k1_nK, k2_nK, k):
    """Every slot's score (the sum of the two half dot products), then one top-k."""
    return jax.lax.top_k(_pair_scores(q_TK, k1_nK, k2_nK), k)   # ties: lower slot index first


def inputs(seed, t, n, d, integer):
    keys = jax.random.split(jax.random.key(seed), 3)
    if integer:  # small integers: many exactly equal scores, sums exact in float32
        draw = lambda key, shape: jax.random.randint(key, shape, -2, 3).astype(jnp.float32)  # noqa: E731
    else:
        draw = lambda key, shape: jax.random.normal(key, shape)  # noqa: E731
    return draw(keys[0], (t, d)), draw(keys[1], (n, d // 2)), draw(keys[2], (n, d // 2))


@pytest.mark.parametrize("seed, t, n, d, k, integer", [
    (0, 64, 16, 8, 4, False), (1, 32, 8, 6, 8, False),        # k = n
    (2, 64, 16, 4, 5, True), (3, 64, 6, 2, 6, True),          # ties, incl. k = n
    (4, 16, 3, 2, 1, True), (5, 8, 32, 16, 32, False)])
def test_topk_equals_brute_force(seed, t, n, d, k, integer):
    q, k1, k2 = inputs(seed, t, n, d, integer)
    scores, idx = jax.jit(product_key_topk, static_argnums=3)(q, k1, k2, k)
    ref_scores, ref_idx = brute_force(q, k1, k2, k)
    if integer:
        # the test really has ties across the k-th place
        full = np.sort(np.asarray(brute_force(q, k1, k2, n * n)[0]), axis=1)[:, ::-1]
        assert (full[:, k - 1] == full[:, min(k, n * n - 1)]).any() or k == n * n
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(ref_idx))
    np.testing.assert_allclose(np.asarray(scores), np.asarray(ref_scores), rtol=1e-6, atol=1e-6)
    assert idx.dtype == jnp.int32 and int(idx.min()) >= 0 and int(idx.max()) < n * n


def test_topk_rejects_bad_arguments():
    q, k1, k2 = inputs(0, 4, 8, 8, False)
    with pytest.raises(ValueError, match="k=9"):
        product_key_topk(q, k1, k2, 9)
    for bad in (2.0, True):   # a float failed inside lax.top_k; True was k=1
        with pytest.raises(ValueError, match="must be an int"):
            product_key_topk(q, k1, k2, bad)
    with pytest.raises(ValueError, match="subkeys"):
        product_key_topk(q[:, :6], k1, k2, 2)
    # the public half-scores form checks its k too (k > n failed inside lax.top_k)
    s1, s2 = jnp.ones((3, 4)), jnp.ones((3, 4))
    with pytest.raises(ValueError, match=r"topk_from_halves: k=5 must be an int in \[1, n=4\]"):
        topk_from_halves(s1, s2, 5)
    with pytest.raises(ValueError, match="one shape"):
        topk_from_halves(s1, s2[:, :3], 2)


def test_topk_gradients_match_finite_differences_in_float64():
    with jax.enable_x64(True):
        q, k1, k2 = (x.astype(jnp.float64) for x in inputs(7, 6, 5, 4, False))
        w = jax.random.normal(jax.random.key(8), (6, 3), jnp.float64)

        @jax.jit
        def f(q, k1, k2):   # a smooth function of the selected scores (softmax-weighted, as the layer)
            scores, _ = product_key_topk(q, k1, k2, 3)
            return jnp.sum(jax.nn.softmax(scores, axis=-1) * w) + 0.1 * jnp.sum(scores * w)

        grads = jax.grad(f, argnums=(0, 1, 2))(q, k1, k2)
        eps = 1e-6
        for arg, grad in enumerate(grads):
            x = [q, k1, k2]
            flat = np.asarray(x[arg]).reshape(-1)
            fd = np.zeros_like(flat)
            for i in range(flat.size):
                plus, minus = flat.copy(), flat.copy()
                plus[i] += eps
                minus[i] -= eps
                xp, xm = list(x), list(x)
                xp[arg] = jnp.asarray(plus.reshape(x[arg].shape))
                xm[arg] = jnp.asarray(minus.reshape(x[arg].shape))
                fd[i] = (f(*xp) - f(*xm)) / (2 * eps)
            assert grad.dtype == jnp.float64
            np.testing.assert_allclose(np.asarray(grad).reshape(-1), fd, rtol=1e-6, atol=1e-8)
            assert np.abs(fd).max() > 1e-3   # the case is not trivially zero


def layer_reference(layer, x_TD):
    """The five steps in plain jnp, brute-force retrieval per head, a plain gather-sum."""
    cfg = layer.cfg
    q = jnp.einsum("td,dhk->thk", x_TD, layer.w_q[...])
    q = q / jnp.sqrt(jnp.mean(q * q, axis=-1, keepdims=True) + 1e-6) * layer.q_scale[...][None]
    values = layer.values.mem_values[...]
    mem = jnp.zeros((x_TD.shape[0], values.shape[1]))
    for h in range(cfg.num_heads):
        keys = layer.subkeys[...][h]
        scores, idx = brute_force(q[:, h], keys[0], keys[1], cfg.top_k)
        mem = mem + jnp.einsum("tk,tkv->tv", jax.nn.softmax(scores, -1), values[idx])
    return (mem * jax.nn.silu(x_TD @ layer.w_gate[...])) @ layer.w_out[...]


def test_layer_matches_reference_and_shares_values():
    cfg = MemoryConfig(num_slots=64, top_k=4, num_heads=2, d_key=8, d_value=12)
    layer = ProductKeyMemory(cfg, 16, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 5, 16))
    y = nnx.jit(lambda m, x: m.read(x))(layer, x)
    ref = nnx.jit(layer_reference)(layer, x.reshape(10, 16)).reshape(2, 5, 16)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=2e-5, atol=2e-6)
    # two layers with one value table: one Param in the state, gradients from both layers
    values = MemoryValues(64, 12, rngs=nnx.Rngs(1))
    pair = nnx.List([ProductKeyMemory(cfg, 16, rngs=nnx.Rngs(i), values=values) for i in (2, 3)])
    assert len(jax.tree.leaves(nnx.state(pair, nnx.Param))) == 2 * 5 + 1
    grads = nnx.jit(nnx.grad(lambda p: sum(jnp.sum(m.read(x) ** 2) for m in p)))(pair)
    g_values = grads[0]["values"]["mem_values"][...]
    one = nnx.jit(nnx.grad(lambda m: jnp.sum(m.read(x) ** 2)))
    grads_one = [one(m)["values"]["mem_values"][...] for m in pair]
    np.testing.assert_allclose(np.asarray(g_values), np.asarray(grads_one[0] + grads_one[1]),
                               rtol=1e-5, atol=1e-6)
