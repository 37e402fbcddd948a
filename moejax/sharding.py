"""Logical axis names -> mesh axes (a rules value); mesh helpers.

Model code speaks logical names only (``batch, seq, embed, mlp, expert,
heads, kv_heads, vocab, mem_values`` and the cache axes ``cache_batch,
cache_seq, cache_heads``). A :class:`ShardingRules` value maps them to mesh
axes (``data, fsdp, expert, tensor``): :data:`DEFAULT_RULES` for training,
:data:`SERVING_RULES` (no FSDP) for serving, or any table of your own.

The rules in force are a context, like the mesh: ``with
sharding.use_rules(rules):`` around the code that traces the model (jit
traces read them, as they read ``jax.set_mesh``); entry points that place or
jit things (``shard_model``, ``state_shardings``, the train step) also take
``rules=`` and set the context themselves. When no mesh is set every helper
here is a no-op, so the same model code runs on one device.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from collections.abc import Iterator, Mapping, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moejax.mesh_spec import MESH_AXES, check_mesh_shape, parse_mesh_spec  # noqa: F401 (public here)



class FallbackWarning(UserWarning):
    """A requested parallel layout or backend cannot apply here; what runs instead is named."""


_logger = logging.getLogger("moejax")
_noticed: set[str] = set()


def notice_once(message: str) -> None:
    """Log a substitution that changes speed, not results (e.g. an emulated collective)
    once per process at WARNING level; ones that change the layout use FallbackWarning."""
    if message not in _noticed:
        _noticed.add(message)
        _logger.warning(message)


class ShardingRules(Mapping):
    """Frozen, hashable map: logical axis -> the mesh axes it is split over (in order).

    Names it does not list are replicated. ``rules.replace(embed=())`` gives a
    changed copy. Hashable, so a rules value can be a static jit argument."""

    def __init__(self, table: Mapping[str, Sequence[str]]):
        items = []
        for name, axes in table.items():
            axes = (axes,) if isinstance(axes, str) else tuple(axes)
            if not all(isinstance(a, str) for a in axes) or len(set(axes)) != len(axes):
                raise ValueError(f"ShardingRules[{name!r}]: mesh axes must be distinct names, "
                                 f"got {axes!r}")
            items.append((name, axes))
        self._items = tuple(items)
        self._table = dict(items)

    def __getitem__(self, name: str) -> tuple[str, ...]:
        return self._table[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table)

    def __len__(self) -> int:
        return len(self._table)

    def __hash__(self) -> int:
        return hash(self._items)

    def __eq__(self, other) -> bool:
        return isinstance(other, ShardingRules) and self._table == other._table

    def __repr__(self) -> str:
        return f"ShardingRules({self._table!r})"

    def replace(self, **changes: Sequence[str]) -> "ShardingRules":
        return ShardingRules({**self._table, **changes})

    def mesh_axes(self, name: str | None, mesh) -> tuple[str, ...]:
        """The mesh axes of ``name`` that exist in ``mesh`` with size > 1."""
        return tuple(a for a in self.get(name, ()) if mesh.shape.get(a, 1) > 1) if name else ()


# Training: batch over every data-like axis, weights FSDP-split over their embed dim.
DEFAULT_RULES = ShardingRules({
    "batch": ("data", "fsdp", "expert"),
    "seq": (),
    "embed": ("fsdp",),
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "vocab": ("tensor",),
    "expert": ("expert",),
    "mem_values": ("expert", "tensor"),
    "cache_batch": ("data", "fsdp", "expert"),
    "cache_seq": (),
    "cache_heads": ("tensor",),
})
# Serving: no FSDP (weights whole along embed, nothing gathered per step); caches split
# over the batch axes and the tensor axis like the heads that fill them.
SERVING_RULES = DEFAULT_RULES.replace(embed=())
LOGICAL_RULES = DEFAULT_RULES  # the name earlier code used for the one table

_RULES: contextvars.ContextVar[ShardingRules] = contextvars.ContextVar(
    "moejax_sharding_rules", default=DEFAULT_RULES)


def current_rules() -> ShardingRules:
    """The rules in force (``use_rules``), DEFAULT_RULES outside any."""
    return _RULES.get()


@contextlib.contextmanager
def use_rules(rules: ShardingRules | None):
    """Trace model code under ``rules`` (None: leave the current rules in force).

    The rules are read while tracing: a jitted function keeps the layout of the
    rules it was first traced under (jit caches do not key on this context), so
    jit a fresh function per rules value, as the train step does."""
    if rules is None:
        yield current_rules()
        return
    if not isinstance(rules, ShardingRules):
        raise TypeError(f"rules must be a ShardingRules, got {type(rules).__name__}")
    token = _RULES.set(rules)
    try:
        yield rules
    finally:
        _RULES.reset(token)


def make_mesh(spec: str | Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with all four axes (unnamed ones get size 1), checked against the devices.
    ``spec``: 'data=2,expert=4' or {'data': 2, 'expert': 4}; axes are the names of
    MESH_AXES, sizes integers >= 1 (no wildcard) whose product is the device count."""
    shape = parse_mesh_spec(spec) if isinstance(spec, str) else check_mesh_shape(spec)
    devices = list(jax.devices() if devices is None else devices)
    need = math.prod(shape.values())
    if need != len(devices):
        platform = f" ({devices[0].platform})" if devices else ""
        raise ValueError(f"mesh {shape} needs {need} devices but {len(devices)} are available"
                         f"{platform}; the product of the axis sizes must equal the device count")
    sizes = tuple(shape.get(axis, 1) for axis in MESH_AXES)
    # Auto axes: the compiler propagates shardings from parameters and from
    # the constraints placed with `constrain` (GSPMD style).
    return jax.make_mesh(sizes, MESH_AXES, devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def current_mesh():
    """The mesh set with ``jax.set_mesh``, or None."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh,
                    rules: ShardingRules | None = None) -> P:
    """PartitionSpec for an array under ``rules`` (default: the current rules); mesh axes
    that do not divide a dim, or that an earlier dim already uses, are left out (that
    dim is then less sharded)."""
    rules = current_rules() if rules is None else rules
    used: set[str] = set()
    spec = []
    for name, dim in zip(logical_axes, shape):
        axes = []
        for axis in rules.get(name, ()) if name else ():
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
    spec = logical_to_spec(logical_axes, x.shape, mesh)
    if not isinstance(x, jax.core.Tracer) and not isinstance(getattr(x, "sharding", None), NamedSharding):
        # eager, on an array not on the mesh yet (a model run under jax.set_mesh without
        # shard_model): place it, since outside jit the constraint takes mesh arrays only
        return jax.device_put(x, NamedSharding(jax.sharding.get_mesh(), spec))
    return jax.lax.with_sharding_constraint(x, spec)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def variable_spec(variable: nnx.Variable, mesh, rules: ShardingRules | None = None) -> P:
    """PartitionSpec of one nnx Variable from its ``logical_axes`` metadata
    (also for abstract variables from ``nnx.eval_shape``)."""
    shape = tuple(variable.shape)
    axes = variable.get_metadata().get("logical_axes") or (None,) * len(shape)
    if len(axes) != len(shape):
        raise ValueError(f"logical_axes {axes} do not match a value of shape {shape}")
    return logical_to_spec(axes, shape, mesh, rules)


def state_shardings(state, mesh: Mesh, rules: ShardingRules | None = None):
    """NamedShardings for an ``nnx.State`` (same tree), from the logical-axis rules."""
    return jax.tree.map(lambda v: NamedSharding(mesh, variable_spec(v, mesh, rules)), state,
                        is_leaf=_is_variable)


def shard_model(model: nnx.Module, mesh: Mesh, rules: ShardingRules | None = None) -> None:
    """Place every variable of ``model`` on ``mesh`` according to ``rules`` (default:
    the current rules), in place."""
    graphdef, state = nnx.split(model)
    shardings = state_shardings(state, mesh, rules)
    values = jax.tree.map(lambda v: v[...], state, is_leaf=_is_variable)
    placed = jax.device_put(values, jax.tree.map(lambda s: s, shardings, is_leaf=_is_variable))
    nnx.update(model, placed)
