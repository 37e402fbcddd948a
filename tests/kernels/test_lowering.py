"""per_lowering_platform: each platform's function is traced only where the code is lowered
for that platform, and the primitive batches; gmm's backend='auto' is built on it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.gmm import gmm
from kernels_pallas.gmm.reference import gmm_reference
from kernels_pallas.lowering import per_lowering_platform


class Counting:
    """A platform function that counts how often it is traced."""

    def __init__(self, fn):
        self.fn, self.traced = fn, 0

    def __call__(self, *args):
        self.traced += 1
        return self.fn(*args)


def _pair(tpu_fn):
    def f(x):
        return per_lowering_platform(lambda a: (a + 1.0,), {"tpu": tpu_fn}, x)[0]
    return f


def test_jit_on_cpu_never_traces_the_accelerator_function_export_does():
    tpu = Counting(lambda a: (a * 2.0,))
    f = _pair(tpu)
    x = jnp.arange(4.0)
    np.testing.assert_array_equal(jax.jit(f)(x), np.arange(4.0) + 1)
    np.testing.assert_array_equal(f(x), np.arange(4.0) + 1)   # eager too
    assert tpu.traced == 0
    module = jax.export.export(jax.jit(f), platforms=["tpu"])(x).mlir_module()
    assert tpu.traced == 1
    assert "stablehlo.multiply" in module and "stablehlo.add" not in module
    cpu_module = jax.export.export(jax.jit(f), platforms=["cpu"])(x).mlir_module()
    assert "stablehlo.add" in cpu_module and "stablehlo.multiply" not in cpu_module


def test_vmap_batches_each_platform_function():
    tpu = Counting(lambda a, b: (a * b,))

    def f(a, b):
        return per_lowering_platform(lambda a, b: (a @ b,), {"tpu": tpu}, a, b)[0]

    a = jnp.arange(12.0).reshape(3, 2, 2)
    b = jnp.arange(4.0).reshape(2, 2)
    got = jax.jit(jax.vmap(f, in_axes=(0, None)))(a, b)
    np.testing.assert_allclose(got, np.einsum("xij,jk->xik", np.asarray(a), np.asarray(b)))
    jax.export.export(jax.jit(jax.vmap(f, in_axes=(0, None))), platforms=["tpu"])(a, b)
    assert tpu.traced == 1


def test_mismatched_accelerator_output_and_bad_use_are_errors():
    x = jnp.ones((3,))
    with pytest.raises(TypeError, match="the tpu function returns"):
        jax.export.export(jax.jit(_pair(lambda a: (a[:2],))), platforms=["tpu"])(x)
    with pytest.raises(NotImplementedError, match="no function for 'cuda'"):
        jax.export.export(jax.jit(_pair(lambda a: (a,))), platforms=["cuda"])(x)
    with pytest.raises(ValueError, match="unknown platforms"):
        per_lowering_platform(lambda a: (a,), {"metal": lambda a: (a,)}, x)

    @jax.jit
    def closes_over(y):
        return per_lowering_platform(lambda a: (a + y,), {}, x)
    with pytest.raises(ValueError, match="closes over a traced value"):
        closes_over(x)
    with pytest.raises(ValueError, match="side effects"):
        per_lowering_platform(lambda a: (jax.debug.print("{}", a) or a,), {}, x)


def test_auto_gmm_under_vmap_and_grad_equals_the_reference():
    rng = np.random.default_rng(0)
    lhs = jnp.asarray(rng.standard_normal((2, 12, 8)), jnp.float32)
    rhs = jnp.asarray(rng.standard_normal((3, 8, 5)), jnp.float32)
    sizes = jnp.asarray([[4, 0, 6], [1, 9, 2]], jnp.int32)

    def score(out):
        return jnp.sum(out * jnp.cos(out))

    def batched(lhs, rhs):        # the primitive's batching rule
        return score(jax.vmap(lambda a, s: gmm(a, rhs, s))(lhs, sizes))

    def looped(lhs, rhs):         # one example at a time (ragged_dot has no vmap)
        return sum(score(gmm_reference(lhs[i], rhs, sizes[i])) for i in range(len(sizes)))

    want = jax.value_and_grad(looped, argnums=(0, 1))(lhs, rhs)
    got = jax.jit(jax.value_and_grad(batched, argnums=(0, 1)))(lhs, rhs)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
