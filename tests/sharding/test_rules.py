"""The logical-axis rules table, make_mesh, and shardings for every preset."""

import math

import jax
import pytest
from flax import nnx
from jax.sharding import NamedSharding

import moejax
from moejax import sharding

LOGICAL_NAMES = ("batch", "seq", "embed", "mlp", "expert", "heads", "kv_heads", "vocab",
                 "mem_values")

# mesh shapes with 1, 2, 4 and 8 devices (the 8 virtual CPU devices of conftest)
MESHES = ["data=1", "expert=2", "fsdp=2", "tensor=2", "data=2,expert=2", "fsdp=2,tensor=2",
          "data=8", "expert=8", "data=2,expert=4", "fsdp=2,expert=2,tensor=2", "fsdp=8",
          "tensor=8"]


def test_rules_table_maps_every_logical_name_to_known_mesh_axes():
    assert set(LOGICAL_NAMES) <= set(sharding.LOGICAL_RULES)
    for name, axes in sharding.LOGICAL_RULES.items():
        assert set(axes) <= set(sharding.MESH_AXES), name
        assert len(set(axes)) == len(axes), f"{name} names a mesh axis twice"
    # the layout the expert-parallel code relies on
    assert sharding.LOGICAL_RULES["expert"] == ("expert",)
    assert sharding.LOGICAL_RULES["batch"] == ("data", "fsdp", "expert")
    assert sharding.LOGICAL_RULES["embed"] == ("fsdp",)
    assert sharding.LOGICAL_RULES["mlp"] == ("tensor",)


def test_logical_to_spec_skips_axes_that_do_not_divide_or_repeat():
    mesh = sharding.make_mesh("data=2,fsdp=2,expert=2")
    assert sharding.logical_to_spec(("batch", "embed"), (8, 6), mesh) == \
        jax.sharding.PartitionSpec(("data", "fsdp", "expert"), None)   # fsdp already used
    assert sharding.logical_to_spec(("batch", None), (2, 3), mesh) == \
        jax.sharding.PartitionSpec("data", None)                       # only 2 divides 2


def _devices(n):
    return jax.devices()[:n]


@pytest.mark.parametrize("preset", moejax.ModelConfig.preset_names())
def test_every_parameter_of_every_preset_gets_a_valid_sharding(preset):
    cfg = moejax.ModelConfig.preset(preset)
    abstract = nnx.eval_shape(lambda: moejax.Transformer(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(abstract)
    variables = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert variables
    for spec in MESHES:
        size = math.prod(sharding.parse_mesh_spec(spec).values())
        mesh = sharding.make_mesh(spec, devices=_devices(size))
        shardings = jax.tree.leaves(sharding.state_shardings(state, mesh),
                                    is_leaf=lambda x: isinstance(x, NamedSharding))
        assert len(shardings) == len(variables)
        for var, named in zip(variables, shardings):
            shape = tuple(var.shape)
            used = [a for entry in named.spec if entry
                    for a in (entry if isinstance(entry, tuple) else (entry,))]
            assert len(used) == len(set(used)), (preset, spec, named.spec)
            for dim, entry in zip(shape, tuple(named.spec) + (None,) * len(shape)):
                axes = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
                assert dim % math.prod(mesh.shape[a] for a in axes) == 0, (preset, spec, shape)
            named.shard_shape(shape)   # raises when the sharding cannot hold the shape


def test_expert_weights_are_split_over_the_expert_axis():
    cfg = moejax.ModelConfig.preset("tiny")
    abstract = nnx.eval_shape(lambda: moejax.Transformer(cfg, rngs=nnx.Rngs(0)))
    mesh = sharding.make_mesh("fsdp=2,expert=2,tensor=2")
    w_gate = abstract.moe_layers[0].experts.w_gate
    assert sharding.variable_spec(w_gate, mesh) == jax.sharding.PartitionSpec(
        "expert", "fsdp", "tensor")


def test_make_mesh_has_all_four_axes_and_checks_devices():
    mesh = sharding.make_mesh("data=2,expert=4")
    assert mesh.axis_names == sharding.MESH_AXES
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}
    assert sharding.make_mesh({"expert": 8}).shape["expert"] == 8


@pytest.mark.parametrize("spec, message", [
    ("data=2,expert=2", "needs 4 devices but 8"),
    ("data=16", "needs 16 devices"),
    ("data=2,expret=4", "unknown mesh axis 'expret'"),
    ("data:2", "expected AXIS=SIZE"),
    ("data=0,expert=8", "expected AXIS=SIZE"),
    ("data=2,data=4", "given twice"),
    ("", "empty mesh spec"),
    ("data=\u00b2", "expected AXIS=SIZE"),      # str.isdigit() is True for a superscript
    ({"expret": 8}, "unknown mesh axis 'expret'"),   # built a 1-device mesh, silently
    ({"data": -2, "expert": -4}, "'data' has size -2"),
    ({"data": True, "expert": 8}, "'data' has size True"),
    ({"data": 8.0}, "'data' has size 8.0"),
])
def test_make_mesh_errors_are_clear(spec, message):
    with pytest.raises(ValueError, match=message):
        sharding.make_mesh(spec)


def test_helpers_are_no_ops_without_a_mesh():
    x = jax.numpy.ones((4, 8))
    assert sharding.current_mesh() is None
    assert sharding.constrain(x, ("batch", "embed")) is x


def test_constrain_places_an_eager_array_not_yet_on_the_mesh():
    """DESIGN's usage runs an unplaced model eagerly under jax.set_mesh: a constraint outside
    jit on a single-device array places it (with_sharding_constraint alone raises TypeError)."""
    x = jax.numpy.arange(32.0).reshape(8, 4)
    mesh = sharding.make_mesh("data=2,expert=4")
    with jax.set_mesh(mesh):
        y = sharding.constrain(x, ("batch", "embed"))
        z = sharding.constrain(y, ("batch", None))          # already on the mesh: a constraint
    for out, axes in ((y, ("batch", "embed")), (z, ("batch", None))):
        assert isinstance(out.sharding, NamedSharding)
        assert out.sharding.spec == sharding.logical_to_spec(axes, x.shape, mesh)
        assert (out == x).all()
