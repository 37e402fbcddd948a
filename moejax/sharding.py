"""Logical axis names -> mesh axes; mesh helpers.

Model code speaks logical names only (``batch, seq, embed, mlp, expert,
heads, kv_heads, vocab, mem_values``). ``LOGICAL_RULES`` is the one table
that maps them to mesh axes (``data, fsdp, expert, tensor``). When no mesh is
set every helper here is a no-op, so the same model code runs on one device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# logical axis -> mesh axes it is split over (in order); () = replicated.
LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp", "expert"),
    "seq": (),
    "embed": ("fsdp",),
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "vocab": ("tensor",),
    "expert": ("expert",),
    "mem_values": ("expert", "tensor"),
}


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """'data=2,expert=4' -> {'data': 2, 'expert': 4}, with clear errors."""
    shape: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, eq, size = part.partition("=")
        name = name.strip()
        if not eq or not size.strip().isdigit() or int(size) < 1:
            raise ValueError(f"bad mesh entry {part!r} in {spec!r}: expected AXIS=SIZE with SIZE >= 1")
        if name not in MESH_AXES:
            raise ValueError(f"unknown mesh axis {name!r} in {spec!r}; allowed: {', '.join(MESH_AXES)}")
        if name in shape:
            raise ValueError(f"mesh axis {name!r} given twice in {spec!r}")
        shape[name] = int(size)
    if not shape:
        raise ValueError(f"empty mesh spec {spec!r}; expected e.g. 'data=2,expert=4'")
    return shape


def make_mesh(spec: str | dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with all four axes (unnamed ones get size 1), checked against the devices."""
    shape = parse_mesh_spec(spec) if isinstance(spec, str) else dict(spec)
    devices = list(jax.devices() if devices is None else devices)
    need = math.prod(shape.values())
    if need != len(devices):
        raise ValueError(f"mesh {shape} needs {need} devices but {len(devices)} are available "
                         f"({devices[0].platform}); the product of the axis sizes must equal the device count")
    sizes = tuple(shape.get(axis, 1) for axis in MESH_AXES)
    # Auto axes: the compiler propagates shardings from parameters and from
    # the constraints placed with `constrain` (GSPMD style).
    return jax.make_mesh(sizes, MESH_AXES, devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def current_mesh():
    """The mesh set with ``jax.set_mesh``, or None."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh) -> P:
    """PartitionSpec for an array; mesh axes that do not divide a dim, or that an
    earlier dim already uses, are left out (that dim is then less sharded)."""
    used: set[str] = set()
    spec = []
    for name, dim in zip(logical_axes, shape):
        axes = []
        for axis in LOGICAL_RULES.get(name, ()) if name else ():
            size = mesh.shape.get(axis, 1)
            if axis in used or size == 1:
                continue
            if dim % (math.prod(mesh.shape[a] for a in axes) * size) == 0:
                axes.append(axis)
        used.update(axes)
        spec.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
    return P(*spec)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint from logical names; identity when no mesh is set."""
    mesh = current_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, x.shape, mesh))


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def variable_spec(variable: nnx.Variable, mesh) -> P:
    """PartitionSpec of one nnx Variable from its ``logical_axes`` metadata
    (also for abstract variables from ``nnx.eval_shape``)."""
    shape = tuple(variable.shape)
    axes = variable.get_metadata().get("logical_axes") or (None,) * len(shape)
    if len(axes) != len(shape):
        raise ValueError(f"logical_axes {axes} do not match a value of shape {shape}")
    return logical_to_spec(axes, shape, mesh)


def state_shardings(state, mesh: Mesh):
    """NamedShardings for an ``nnx.State`` (same tree), from the logical-axis rules."""
    return jax.tree.map(lambda v: NamedSharding(mesh, variable_spec(v, mesh)), state,
                        is_leaf=_is_variable)


def shard_model(model: nnx.Module, mesh: Mesh) -> None:
    """Place every variable of ``model`` on ``mesh`` according to the rules (in place)."""
    graphdef, state = nnx.split(model)
    shardings = state_shardings(state, mesh)
    values = jax.tree.map(lambda v: v[...], state, is_leaf=_is_variable)
    placed = jax.device_put(values, jax.tree.map(lambda s: s, shardings, is_leaf=_is_variable))
    nnx.update(model, placed)
