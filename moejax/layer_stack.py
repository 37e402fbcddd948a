"""Scanned layers: consecutive layers of one FFN kind as one block with stacked parameters.

With ``ModelConfig.scan_layers`` the model holds ``stacks[g].block``, a Block
whose every variable has a leading layer axis (logical axis "layers", which
the sharding rules leave unsplit), built by ``nnx.vmap`` and run by
``nnx.scan``: the step compiles one layer body per group instead of one per
layer. Decode caches of a group are stacked the same way and scanned with it.

Code that addresses layers by index (Hugging Face import/export) works on the
unrolled view: :func:`unstack_layers` turns a scanned model's pure state dict
into ``{"layers": {i: ...}}`` as an unrolled model holds it, and
:func:`stack_layers` turns it back.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.config import ModelConfig

# vmap/scan insert (and remove) the layer axis in each variable's logical_axes too
STACK_METADATA = {nnx.PARTITION_NAME: None, "logical_axes": "layers"}


def is_stacked(variable: nnx.Variable) -> bool:
    """Whether a variable belongs to a scanned group (leading "layers" axis)."""
    axes = variable.get_metadata().get("logical_axes") or ()
    return len(axes) > 0 and axes[0] == "layers"


def layer_groups(cfg: ModelConfig) -> list[tuple[int, int]]:
    """(first layer, count) of each run of consecutive layers with the same FFN kind."""
    groups: list[tuple[int, int]] = []
    for i, kind in enumerate(cfg.ffn_kinds):
        if groups and cfg.ffn_kinds[groups[-1][0]] == kind:
            groups[-1] = (groups[-1][0], groups[-1][1] + 1)
        else:
            groups.append((i, 1))
    return groups


def unstack_tree(tree: Any, count: int) -> list[Any]:
    """A pytree with a leading axis of ``count`` -> ``count`` pytrees."""
    return [jax.tree.map(lambda a, i=i: a[i], tree) for i in range(count)]


class ScannedBlocks(nnx.Module):
    """``count`` layers from ``start`` on, all of one kind: one Block with stacked variables.

    1. Init: ``nnx.vmap`` over ``count`` split rng streams builds the Block once
       per layer and stacks every variable on axis 0.
    2. Call: ``nnx.scan`` over (variables, layer caches) carries the residual
       stream; each step is one Block call (rematerialised as ``remat`` says).
    3. Returns (x, LayerAux with a leading layer axis, stacked caches or None).
    """

    def __init__(self, block_cls, cfg: ModelConfig, start: int, count: int, *, rngs: nnx.Rngs):
        self.count = count

        @nnx.split_rngs(splits=count)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=STACK_METADATA)
        def make(rngs):
            return block_cls(cfg, start, rngs=rngs)
        self.block = make(rngs)

    def init_cache(self, batch_size: int, max_len: int):
        one = self.block.init_cache(batch_size, max_len)
        return jax.tree.map(lambda a: jnp.repeat(a[None], self.count, axis=0), one)

    def __call__(self, x_BSD, ctx, cache=None, *, remat: str = "none"):
        from moejax.model import call_block   # model.py imports this module

        def body(block, x_BSD, layer_cache):
            return call_block(block, x_BSD, ctx, layer_cache, remat)
        scan = nnx.scan(body, in_axes=(0, nnx.Carry, 0), out_axes=(nnx.Carry, 0, 0),
                        transform_metadata=STACK_METADATA)
        return scan(self.block, x_BSD, cache)


def _take(a, i: int):
    if isinstance(a, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(a.shape[1:], a.dtype)
    return a[i]


def _stack(arrays):
    if isinstance(arrays[0], jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(arrays),) + arrays[0].shape, arrays[0].dtype)
    if isinstance(arrays[0], np.ndarray):
        return np.stack(arrays)
    return jnp.stack(arrays)


def unstack_layers(pure: dict, cfg: ModelConfig) -> dict:
    """A model's pure state dict in the unrolled layout (``layers[i]``), whatever ``cfg.scan_layers``.
    Leaves may be arrays or ``jax.ShapeDtypeStruct``s."""
    if not cfg.scan_layers:
        return pure
    out = {k: v for k, v in pure.items() if k != "stacks"}
    out["layers"] = {}
    for g, (start, count) in enumerate(layer_groups(cfg)):
        group = pure["stacks"][g]["block"]
        for j in range(count):
            out["layers"][start + j] = jax.tree.map(lambda a, j=j: _take(a, j), group)
    return out


def stack_layers(flat: dict, cfg: ModelConfig) -> dict:
    """Inverse of :func:`unstack_layers`: the unrolled layout -> the model's own."""
    if not cfg.scan_layers:
        return flat
    out = {k: v for k, v in flat.items() if k != "layers"}
    out["stacks"] = {}
    for g, (start, count) in enumerate(layer_groups(cfg)):
        layers = [flat["layers"][start + j] for j in range(count)]
        out["stacks"][g] = {"block": jax.tree.map(lambda *xs: _stack(xs), *layers)}
    return out
