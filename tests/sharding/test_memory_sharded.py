"""Memory layers on 8 virtual CPU devices: value tables split along their width
(logical axis mem_values: every device holds a slice of every row); outputs and
gradients equal the single-device layers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import sharding
from moejax.config import MemoryConfig
from moejax.memory import NGramMemory, ProductKeyMemory

CFG = MemoryConfig(num_slots=256, top_k=4, num_heads=2, d_key=8, d_value=16,
                   ngram_orders=(2, 3), ngram_heads=2, ngram_table_rows=512, ngram_d_row=8)
B, S, D = 8, 6, 32


def pkm():
    return ProductKeyMemory(CFG, D, rngs=nnx.Rngs(0))


def engram():
    mem = NGramMemory(CFG, D, rngs=nnx.Rngs(0), vocab_size=256)
    mem.conv[...] = 0.3 * jax.random.normal(jax.random.key(5), mem.conv.shape)  # not the zero init
    return mem


def loss(mem, x, tokens):
    # split over the batch axes, as the Transformer hands it over (an unconstrained
    # input hid a wrong query gradient on meshes with expert and tensor > 1)
    x = sharding.constrain(x, ("batch", "seq", "embed"))
    y = mem.read(x) if isinstance(mem, ProductKeyMemory) else mem.apply(x, tokens)[0]
    return jnp.sum(jnp.sin(y)), y


def run(build, mesh=None):
    x = jax.random.normal(jax.random.key(1), (B, S, D))
    tokens = jax.random.randint(jax.random.key(2), (B, S), 0, 256)
    mem = build()
    fn = nnx.jit(nnx.value_and_grad(loss, has_aux=True))
    if mesh is None:
        return fn(mem, x, tokens), None
    with jax.set_mesh(mesh):
        sharding.shard_model(mem, mesh)
        table = mem.values.mem_values if isinstance(mem, ProductKeyMemory) else mem.mem_values
        return fn(mem, x, tokens), table[...].sharding.spec


@functools.cache
def reference(build):
    return run(build)[0]


def close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.shape == y.shape
        assert np.abs(x - y).max() <= 1e-5 * max(np.abs(y).max(), 1e-30)


@pytest.mark.parametrize("build", [pkm, engram], ids=["pkm", "engram"])
@pytest.mark.parametrize("mesh_spec", ["data=2,expert=4", "fsdp=2,expert=2,tensor=2"])
def test_sharded_memory_layer_equals_unsharded(build, mesh_spec):
    (loss_ref, y_ref), grads_ref = reference(build)
    ((loss_sh, y_sh), grads_sh), spec = run(build, sharding.make_mesh(mesh_spec))
    assert spec[0] is None and spec[1] is not None      # rows whole, width split
    close(y_sh, y_ref)
    close(loss_sh, loss_ref)
    close(nnx.to_pure_dict(grads_sh), nnx.to_pure_dict(grads_ref))
    assert np.abs(np.asarray(jax.tree.leaves(nnx.to_pure_dict(grads_ref))[0])).max() > 0
