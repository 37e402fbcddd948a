"""gmm inside shard_map: the custom_vjps' cotangents must match the operands'
varying mesh axes, and the weight gradient must be summed over token shards."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from kernels_pallas.gmm import gmm


def _mesh():
    return jax.make_mesh((4,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))


def _sharded_loss(mesh, matmul):
    """sum(gmm(lhs_shard, rhs, sizes_shard) * ct_shard) over 4 token shards; rhs replicated."""
    def loss(lhs, rhs, sizes, ct):
        def local(lhs_mk, sizes_1g, ct_mn):
            return jax.lax.psum(jnp.sum(matmul(lhs_mk, rhs, sizes_1g[0]) * ct_mn), "x")
        return jax.shard_map(local, mesh=mesh, in_specs=(P("x"), P("x"), P("x")),
                             out_specs=P())(lhs, sizes, ct)
    return loss


@pytest.mark.parametrize("backend", ["xla", "reference", "pallas"])
def test_weight_gradient_sums_over_token_shards(backend):
    # 'pallas' on CPU: the kernels interpreted inside shard_map (check_vma=True)
    rng = np.random.default_rng(0)
    lhs = jnp.asarray(rng.normal(size=(4 * 16, 8)), jnp.float32)
    rhs = jnp.asarray(rng.normal(size=(3, 8, 8)), jnp.float32)
    sizes = jnp.asarray([[5, 0, 11], [16, 0, 0], [0, 7, 6], [1, 1, 1]], jnp.int32)
    ct = jnp.asarray(rng.normal(size=(4 * 16, 8)), jnp.float32)
    mesh = _mesh()
    ours = _sharded_loss(mesh, lambda *a: gmm(*a, backend=backend))
    plain = _sharded_loss(mesh, jax.lax.ragged_dot)  # JAX's own autodiff as the reference
    with jax.set_mesh(mesh):
        got = jax.jit(jax.grad(ours, argnums=(0, 1)))(lhs, rhs, sizes, ct)
        want = jax.jit(jax.grad(plain, argnums=(0, 1)))(lhs, rhs, sizes, ct)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)


def test_pallas_gradient_under_shard_map_lowers_for_tpu():
    # The numerics under shard_map are checked interpreted (above); here the TPU lowering.
    mesh = _mesh()
    loss = _sharded_loss(mesh, lambda *a: gmm(*a, backend="pallas", interpret=False))
    args = (jax.ShapeDtypeStruct((4 * 256, 256), jnp.bfloat16),
            jax.ShapeDtypeStruct((4, 256, 512), jnp.bfloat16),
            jax.ShapeDtypeStruct((4, 4), jnp.int32),
            jax.ShapeDtypeStruct((4 * 256, 512), jnp.bfloat16))
    with jax.set_mesh(mesh):
        exported = jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1))), platforms=["tpu"])(*args)
    assert "tpu_custom_call" in exported.mlir_module()
