"""Pure-jnp grouped matmul: the reference for every kernel and the XLA fallback."""

import jax
import jax.numpy as jnp


def gmm_reference(lhs_MK, rhs_GKN, group_sizes_G, preferred_element_type=None):
    """out[rows of group g] = lhs[rows of group g] @ rhs[g]; rows past sum(group_sizes) are 0.

    ``jax.lax.ragged_dot``: on XLA:CPU a non-finite weight of any group (an empty one too)
    turns every output row non-finite; the other backends keep it to its group's rows.
    """
    return jax.lax.ragged_dot(
        lhs_MK, rhs_GKN, group_sizes_G.astype(jnp.int32),
        preferred_element_type=preferred_element_type,
    )


def tgmm_reference(lhs_MK, grad_MN, group_sizes_G, preferred_element_type=None):
    """Per-group lhs^T @ grad -> [G, K, N] (the weight gradient of gmm)."""
    num_groups = group_sizes_G.shape[0]
    ends = jnp.cumsum(group_sizes_G)
    starts = ends - group_sizes_G
    rows = jnp.arange(lhs_MK.shape[0])
    member_GM = (rows[None, :] >= starts[:, None]) & (rows[None, :] < ends[:, None])
    out_dtype = preferred_element_type or lhs_MK.dtype
    # mask both sides: an inf/NaN in a row of another group (or past the groups) on
    # one side times a zeroed row on the other would be NaN in this group's result
    masked_GMK = jnp.where(member_GM[:, :, None], lhs_MK[None], 0).astype(lhs_MK.dtype)
    masked_GMN = jnp.where(member_GM[:, :, None], grad_MN[None], 0).astype(grad_MN.dtype)
    del num_groups
    return jnp.einsum("gmk,gmn->gkn", masked_GMK, masked_GMN,
                      preferred_element_type=jnp.float32).astype(out_dtype)


def gmm_int8_reference(lhs_MK, rhs_GKN_int8, scale_GN, group_sizes_G, out_dtype=None):
    """Dequantize (rhs * per-output-channel scale) in float32, then the float reference."""
    rhs_GKN = rhs_GKN_int8.astype(jnp.float32) * scale_GN[:, None, :].astype(jnp.float32)
    out_MN = gmm_reference(lhs_MK.astype(jnp.float32), rhs_GKN, group_sizes_G, jnp.float32)
    return out_MN.astype(out_dtype or lhs_MK.dtype)
