"""permute (a gather by token index with a gather backward) against plain autodiff of
``repeat`` then index: same rows forward, same token gradient backward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import dispatch


@pytest.mark.parametrize("top_k", [1, 3])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_permute_matches_repeat_then_gather(top_k, dtype):
    num_tokens, num_experts, d_model = 11, 5, 7
    keys = jax.random.split(jax.random.key(top_k), 3)
    # experts 0..3 only: expert 4 gets no rows (an empty group)
    experts_TK = jax.random.randint(keys[0], (num_tokens, top_k), 0, num_experts - 1)
    x_TD = jax.random.normal(keys[1], (num_tokens, d_model)).astype(dtype)
    g_MD = jax.random.normal(keys[2], (num_tokens * top_k, d_model)).astype(dtype)
    plan = dispatch.plan_sort(experts_TK, num_experts)
    assert int(plan.group_sizes_E[-1]) == 0

    def reference(x_TD):  # autodiff's scatter-add backward, in float32
        return jnp.repeat(x_TD.astype(jnp.float32), top_k, axis=0)[plan.order_M]

    got, vjp = jax.vjp(lambda x: dispatch.permute(x, plan, top_k), x_TD)
    want, ref_vjp = jax.vjp(reference, x_TD)
    assert got.dtype == dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want))
    (dx,), (want_dx,) = vjp(g_MD), ref_vjp(g_MD.astype(jnp.float32))
    assert dx.dtype == dtype
    tol = 0 if dtype == jnp.float32 and top_k == 1 else float(jnp.finfo(dtype).eps) * top_k
    np.testing.assert_allclose(np.asarray(dx, np.float32), np.asarray(want_dx),
                               rtol=tol, atol=tol * float(jnp.max(jnp.abs(want_dx))))
