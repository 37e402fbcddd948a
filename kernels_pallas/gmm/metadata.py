"""Group metadata shared by the kernels: which (group, m-tile) pairs a grid visits.

Rows of lhs are sorted by group: group g owns rows [offsets[g], offsets[g+1]).
A tile of ``tm`` rows can straddle several groups, so the kernels iterate over
*work items*, one per (group, m-tile) pair that overlaps, in row order. Items
of one m-tile are consecutive, so an output block stays resident while each
group writes its own rows into it with a masked store.
"""

from typing import NamedTuple

import jax.numpy as jnp


class GroupMetadata(NamedTuple):
    offsets: "jnp.ndarray"     # [num_groups + 1] int32 row offsets (clamped to M)
    group_ids: "jnp.ndarray"   # [max_items] int32 group of each work item
    m_tile_ids: "jnp.ndarray"  # [max_items] int32 m-tile of each work item
    num_items: "jnp.ndarray"   # [1] int32 how many of the max_items are real


def max_work_items(m, tm, num_groups, *, with_tail, visit_empty):
    """Static bound on the number of work items (the size of the item grid axis)."""
    tiles_m = -(-m // tm)
    if visit_empty:
        # Non-empty groups touch <= tiles_m + (#non-empty - 1) tiles; empties add one each.
        return tiles_m + num_groups - 1
    # G groups (+ the tail) cover [0, M): each internal boundary adds at most one item.
    return tiles_m + num_groups - (0 if with_tail else 1)


def make_group_metadata(group_sizes_G, m, tm, *, with_tail, visit_empty):
    """Work items for G groups over M rows split into tiles of tm.

    with_tail: add a pseudo-group G owning rows [sum(group_sizes), M), so that
      the forward kernel writes zeros there (every output tile gets visited).
    visit_empty: give every empty group one item (tgmm must write its zeros).
    Group sizes past M are clamped: rows beyond M do not exist.
    """
    num_groups = group_sizes_G.shape[0]
    sizes = group_sizes_G.astype(jnp.int32)
    ends = jnp.minimum(jnp.cumsum(sizes), m)
    if with_tail:
        ends = jnp.concatenate([ends, jnp.full((1,), m, jnp.int32)])
    offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends])
    starts = offsets[:-1]
    tiles_m = -(-m // tm)
    first_tile = jnp.minimum(starts // tm, tiles_m - 1)
    last_tile = (ends - 1) // tm
    count = jnp.where(ends > starts, last_tile - first_tile + 1, 0)
    if visit_empty:
        count = jnp.maximum(count, 1)
    item_ends = jnp.cumsum(count)
    num_items = item_ends[-1]
    max_items = max_work_items(m, tm, num_groups, with_tail=with_tail, visit_empty=visit_empty)
    # Items past num_items repeat the last real item, so their blocks are already resident.
    item = jnp.minimum(jnp.arange(max_items, dtype=jnp.int32), num_items - 1)
    group_ids = jnp.searchsorted(item_ends, item, side="right").astype(jnp.int32)
    first_item_of_group = item_ends[group_ids] - count[group_ids]
    m_tile_ids = first_tile[group_ids] + (item - first_item_of_group)
    return GroupMetadata(offsets, group_ids, m_tile_ids.astype(jnp.int32),
                         num_items.reshape(1).astype(jnp.int32))
