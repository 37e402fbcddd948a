"""Types that kernels need to be callable inside ``jax.shard_map`` (check_vma=True).

Inside shard_map every value records the mesh axes it varies over. A
custom_vjp must return cotangents typed like its operands, and a
``pallas_call`` must declare how its output varies. Outside shard_map every
set is empty and these helpers change nothing.
"""

import jax


def match_varying(*arrays):
    """Cast the operands to vary over the union of their mesh axes.

    Then every cotangent a kernel's backward returns has its operand's type,
    and autodiff of the cast inserts the psum that reduces a gradient over the
    axes its operand did not vary over (e.g. a weight gradient over token shards).
    """
    sets = [jax.typeof(a).manual_axis_type.varying for a in arrays]
    union = frozenset().union(*sets)
    return tuple(jax.lax.pcast(a, tuple(sorted(union - s)), to="varying") if union - s else a
                 for a, s in zip(arrays, sets))


def out_struct(shape, dtype, like) -> jax.ShapeDtypeStruct:
    """Output type of a pallas_call that varies like ``like`` (operands already matched)."""
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.typeof(like).manual_axis_type)


def varying_axes(*arrays) -> frozenset:
    """The mesh axes any of ``arrays`` varies over (empty outside shard_map)."""
    return frozenset().union(*(jax.typeof(a).manual_axis_type.varying for a in arrays))


def interpret_mode(interpret, *operands):
    """``interpret=`` for a Mosaic TPU ``pallas_call`` on these operands.

    Pallas's default (HLO) interpreter evaluates the index maps with the
    program ids typed invariant and the scalar-prefetch operands typed as they
    vary, so inside ``shard_map`` (check_vma=True) any index map that indexes
    a prefetched array fails a varying-axes check. The TPU interpreter
    (``pltpu.InterpretParams``) runs the same kernel there; it is used only
    where needed (it is slower), reading out-of-bounds block contents as
    uninitialized like the hardware (the kernels mask them).
    """
    if not interpret or not varying_axes(*operands):
        return interpret
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.InterpretParams(out_of_bounds_reads="uninitialized")
