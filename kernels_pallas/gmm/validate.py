"""Argument checks shared by every gmm backend: clear ValueErrors before any tracing."""

import jax.numpy as jnp


def _shape(x):
    return tuple(getattr(x, "shape", ()))


def check_group_sizes(op, group_sizes, num_groups):
    if len(_shape(group_sizes)) != 1:
        raise ValueError(f"{op}: group_sizes must be 1-D [G], got shape {_shape(group_sizes)}")
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"{op}: group_sizes must have an integer dtype, got {group_sizes.dtype}")
    if num_groups is not None and group_sizes.shape[0] != num_groups:
        raise ValueError(f"{op}: group_sizes has length {group_sizes.shape[0]} but there are "
                         f"{num_groups} groups (rhs.shape[0])")


def check_gmm(op, lhs, rhs, group_sizes):
    """lhs [M,K], rhs [G,K,N], group_sizes [G] integer."""
    if len(_shape(lhs)) != 2:
        raise ValueError(f"{op}: lhs must be 2-D [M, K], got shape {_shape(lhs)}")
    if len(_shape(rhs)) != 3:
        raise ValueError(f"{op}: rhs must be 3-D [G, K, N], got shape {_shape(rhs)}")
    if lhs.shape[1] != rhs.shape[1]:
        raise ValueError(f"{op}: contraction dims differ: lhs is [M, K={lhs.shape[1]}] but "
                         f"rhs is [G, K={rhs.shape[1]}, N]")
    check_group_sizes(op, group_sizes, rhs.shape[0])


def check_tgmm(op, lhs, grad, group_sizes):
    """lhs [M,K], grad [M,N], group_sizes [G] integer."""
    if len(_shape(lhs)) != 2 or len(_shape(grad)) != 2:
        raise ValueError(f"{op}: lhs [M, K] and grad [M, N] must be 2-D, got shapes "
                         f"{_shape(lhs)} and {_shape(grad)}")
    if lhs.shape[0] != grad.shape[0]:
        raise ValueError(f"{op}: lhs has {lhs.shape[0]} rows but grad has {grad.shape[0]}")
    check_group_sizes(op, group_sizes, None)


def check_int8(op, rhs, rhs_scale):
    """rhs int8 [G,K,N] with per-output-channel scales [G,N]."""
    if rhs.dtype != jnp.int8:
        raise ValueError(f"{op}: rhs must be int8, got {rhs.dtype}")
    expected = (rhs.shape[0], rhs.shape[2])
    if _shape(rhs_scale) != expected:
        raise ValueError(f"{op}: rhs_scale must have shape [G, N] = {expected}, got "
                         f"{_shape(rhs_scale)}")
    if not jnp.issubdtype(rhs_scale.dtype, jnp.floating):
        raise ValueError(f"{op}: rhs_scale must be floating point, got {rhs_scale.dtype}")


def check_floating(op, hint="", **operands):
    """Floating operands only: integer inputs ran and came back truncated to an integer dtype."""
    if not all(jnp.issubdtype(x.dtype, jnp.floating) for x in operands.values()):
        names = " and ".join(operands)
        dtypes = " and ".join(str(x.dtype) for x in operands.values())
        raise ValueError(f"{op}: {names} must be floating point{hint}, got {dtypes}")
