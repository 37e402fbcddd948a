"""The logical-axis rules are a value: contexts, serving rules, expert parallelism that
follows whatever mesh axes the rules name, and warnings where a layout cannot apply."""

import pathlib
import re

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import moejax
from moejax import sharding

D, F, E, K = 16, 32, 8, 2


def test_rules_are_a_frozen_hashable_mapping():
    rules = sharding.DEFAULT_RULES
    assert sharding.LOGICAL_RULES is rules and dict(rules)["embed"] == ("fsdp",)
    assert hash(rules.replace(embed=("fsdp",))) == hash(rules) and rules.replace(embed=()) != rules
    with pytest.raises(TypeError):
        rules["embed"] = ()  # noqa
    assert sharding.SERVING_RULES["embed"] == ()              # no FSDP when serving
    for name in ("cache_batch", "cache_seq", "cache_heads"):
        assert name in rules and name in sharding.SERVING_RULES
    with pytest.raises(ValueError, match="distinct"):
        sharding.ShardingRules({"batch": ("data", "data")})


def test_use_rules_sets_and_restores_the_rules_in_force():
    mesh = sharding.make_mesh("fsdp=2,expert=4")
    assert sharding.logical_to_spec(("embed",), (16,), mesh) == P("fsdp")
    with sharding.use_rules(sharding.SERVING_RULES):
        assert sharding.current_rules() is sharding.SERVING_RULES
        assert sharding.logical_to_spec(("embed",), (16,), mesh) == P(None)
        with sharding.use_rules(None):  # None keeps what is in force
            assert sharding.current_rules() is sharding.SERVING_RULES
    assert sharding.current_rules() is sharding.DEFAULT_RULES
    # an explicit argument wins over the context
    assert sharding.logical_to_spec(("embed",), (16,), mesh, sharding.SERVING_RULES) == P(None)


def test_shard_model_follows_the_rules_it_is_given():
    mesh = sharding.make_mesh("fsdp=2,expert=4")
    model = moejax.Transformer(moejax.ModelConfig.preset("tiny").replace(n_layers=1),
                               rngs=nnx.Rngs(0))
    sharding.shard_model(model, mesh, sharding.SERVING_RULES)
    w_gate = model.moe_layers[0].experts.w_gate[...]
    assert w_gate.sharding.spec == P("expert", None, None)
    sharding.shard_model(model, mesh)
    assert model.moe_layers[0].experts.w_gate[...].sharding.spec == P("expert", "fsdp", None)


def _layer_pair(**changes):
    cfg = moejax.MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=K, dispatch="ragged", **changes)
    return (moejax.MoE(cfg, rngs=nnx.Rngs(0)),
            moejax.MoE(cfg.replace(dispatch="dense"), rngs=nnx.Rngs(0)))


X = jax.random.normal(jax.random.key(1), (4, 8, D))


def _assert_close(a, b, rtol=1e-5):
    a, b = np.asarray(a), np.asarray(b)
    assert np.abs(a - b).max() <= rtol * np.abs(b).max()


@pytest.mark.parametrize("mesh_spec, rules", [
    ("fsdp=2,expert=4", sharding.SERVING_RULES),
    # experts and tokens spread over the mesh axis called 'tensor': expert parallelism
    # names no axis itself, it reads them from the rules
    ("data=2,tensor=4", sharding.DEFAULT_RULES.replace(expert=("tensor",), mlp=(),
                                                       batch=("data", "tensor"))),
])
def test_expert_parallelism_follows_the_rules(mesh_spec, rules):
    layer, ref = _layer_pair()
    y_ref, _ = nnx.jit(lambda m, x: m(x))(ref, X)
    mesh = sharding.make_mesh(mesh_spec)
    with jax.set_mesh(mesh), sharding.use_rules(rules):
        sharding.shard_model(layer, mesh)
        y, aux = nnx.jit(lambda m, x: m(x))(layer, X)
    _assert_close(y, y_ref)
    assert float(aux["dispatch_bytes"]) > 0 and float(aux["ep_overflow"]) == 0.0


def test_expert_parallelism_that_cannot_apply_says_why():
    layer, ref = _layer_pair()
    mesh = sharding.make_mesh("data=2,expert=4")
    x = X[:1, :6]                                   # 6 tokens over 8 token shards
    with jax.set_mesh(mesh):
        with pytest.warns(sharding.FallbackWarning, match="6 tokens do not split evenly"):
            y, aux = nnx.jit(lambda m, x: m(x))(layer, x)
    _assert_close(y, nnx.jit(lambda m, x: m(x))(ref, x)[0])
    assert float(aux["dispatch_bytes"]) == 0.0      # ran without the exchange


def test_model_code_names_no_physical_mesh_axis():
    """Only sharding.py (the rules) and mesh_spec.py (the axes' names) may name the mesh axes
    data / fsdp / tensor ('expert' is also a logical name, so it cannot be told apart this way)."""
    root = pathlib.Path(moejax.__file__).parent
    offenders = [str(path.relative_to(root)) for path in root.rglob("*.py")
                 if path.name not in ("sharding.py", "mesh_spec.py")
                 and re.search(r"""["'](data|fsdp|tensor)["']""", path.read_text())]
    assert offenders == []


def test_train_logs_the_chosen_backends():
    from moejax.moe import moe_backends
    cfg = moejax.ModelConfig.preset("tiny").moe
    line = moe_backends(cfg, sharding.make_mesh("data=2,expert=4"))
    assert "dispatch auto" in line and "gmm kernel xla (auto on cpu)" in line
    assert "2 experts per device over ('expert',), exchange all_to_all (auto on cpu)" in line
    assert "cannot apply (6 experts" in moe_backends(cfg.replace(num_experts=6, top_k=2),
                                                     sharding.make_mesh("expert=4,data=2"))
