"""Shared helpers for comparing MoE backends with the dense reference."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import moejax


def build(cfg: moejax.MoEConfig, seed: int = 0, collapse: bool = False) -> moejax.MoE:
    """An MoE layer; ``collapse`` rigs the router so every token picks the same experts
    (expert 0 first, then the lowest ids), leaving most experts with no tokens."""
    layer = moejax.MoE(cfg, rngs=nnx.Rngs(seed))
    if collapse:
        kernel = np.zeros((cfg.d_model, cfg.num_experts), np.float32)
        kernel[:, 0] = 1.0
        kernel[:, 1:] = 1e-3 * np.random.default_rng(seed).normal(size=(cfg.d_model, cfg.num_experts - 1))
        layer.router.kernel[...] = jnp.asarray(kernel)
    return layer


def inputs(cfg: moejax.MoEConfig, batch: int, seq: int, seed: int, positive: bool = False):
    x = jax.random.normal(jax.random.key(seed), (batch, seq, cfg.d_model), jnp.float32)
    return jnp.abs(x) + 0.5 if positive else x


def loss_and_grads(layer: moejax.MoE, x, cotangent):
    """Scalar loss touching the output and the router losses; grads w.r.t. params and x."""
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def loss(params, x):
        y, aux = nnx.merge(graphdef, params, rest)(x)
        return jnp.sum(y * cotangent) + aux["router_loss"], (y, aux)

    # One compile per call beats eager mode, which compiles every op for every new shape.
    value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (value, (y, aux)), grads = value_and_grad(params, x)
    return y, aux, grads


def assert_close(actual, expected, rtol=1e-5, what=""):
    """max |a - b| <= rtol * max |b| (plus a float32-ulp floor for all-zero references)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = np.max(np.abs(expected)) if expected.size else 0.0
    err = np.max(np.abs(actual - expected)) if expected.size else 0.0
    assert err <= rtol * scale + 1e-9, f"{what}: max abs err {err:.3e} vs scale {scale:.3e}"


def assert_trees_close(actual, expected, rtol=1e-5, what=""):
    flat_a = jax.tree_util.tree_flatten_with_path(actual)[0]
    flat_e = jax.tree_util.tree_flatten_with_path(expected)[0]
    assert [p for p, _ in flat_a] == [p for p, _ in flat_e]
    for (path, a), (_, e) in zip(flat_a, flat_e):
        assert_close(a, e, rtol, f"{what}{jax.tree_util.keystr(path)}")
