"""Mesh shapes as users write them ('data=2,expert=4' or {'data': 2, 'expert': 4}).

Plain Python (no jax import), so command lines check ``--mesh`` with their
other flags, before jax is imported; ``moejax.sharding`` builds the mesh.
"""

from __future__ import annotations

from collections.abc import Mapping

from moejax.validate import as_int

MESH_AXES = ("data", "fsdp", "expert", "tensor")


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """'data=2,expert=4' -> {'data': 2, 'expert': 4}, with clear errors."""
    shape: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, eq, size = part.partition("=")
        name, size = name.strip(), size.strip()
        if not eq or not size.isdecimal() or int(size) < 1:
            raise ValueError(f"bad mesh entry {part!r} in {spec!r}: expected AXIS=SIZE with SIZE >= 1")
        if name in shape:
            raise ValueError(f"mesh axis {name!r} given twice in {spec!r}")
        shape[name] = int(size)
    if not shape:
        raise ValueError(f"empty mesh spec {spec!r}; expected e.g. 'data=2,expert=4'")
    return check_mesh_shape(shape, spec)


def check_mesh_shape(shape: Mapping[str, int], spec: object = None) -> dict[str, int]:
    """A mesh shape {axis: size} with known axis names and integer sizes >= 1, as a dict
    (``spec``: what the user wrote, for the messages)."""
    spec = dict(shape) if spec is None else spec
    for name, size in shape.items():
        if name not in MESH_AXES:
            raise ValueError(f"unknown mesh axis {name!r} in {spec!r}; allowed: {', '.join(MESH_AXES)}")
        if as_int(size) is None or as_int(size) < 1:
            raise ValueError(f"mesh axis {name!r} has size {size!r} in {spec!r}; "
                             f"expected an integer >= 1")
    return {name: as_int(size) for name, size in shape.items()}
