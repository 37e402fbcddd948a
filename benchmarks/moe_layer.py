"""MoE layer vs a dense FFN of the same active FLOPs vs a plain ragged_dot MoE.

Forward + backward (gradients w.r.t. the input and every parameter) of:
  moe        moejax.MoE with dispatch='ragged' (the CPU default: sort, XLA grouped matmul)
  dense      SwiGLU FFN of width top_k * d_ff on the same tokens (same active FLOPs)
  ragged_dot the same MoE layer with the grouped matmul done by jax.lax.ragged_dot
All three are timed interleaved in one process; ratios are to 'dense'.

    PYTHONPATH=. python benchmarks/moe_layer.py
    PYTHONPATH=. python benchmarks/moe_layer.py --shapes E8-k2-D512-F1024 --rounds 5
"""

import argparse

import jax
import jax.numpy as jnp
from flax import nnx

import moejax
from benchmarks.timing import format_table, interleaved_samples
from moejax import dispatch
from moejax.moe import SwiGLU

SHAPES = {  # name: (experts E, top_k, d_model D, d_ff F, tokens)
    "E8-k2-D512-F1024": (8, 2, 512, 1024, 8192),
    "E64-k8-D512-F256": (64, 8, 512, 256, 8192),
}


def _grad_step(module, loss_of):
    """jit(x, ct) -> grads of sum(f(x) * ct) w.r.t. (params, x)."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def loss(params, x, ct):
        return jnp.sum(loss_of(nnx.merge(graphdef, params, rest), x) * ct)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return lambda x, ct: grad(params, x, ct)


def _moe_with_gmm_backend(gmm_backend):
    """The MoE layer's forward with an explicit grouped-matmul backend."""
    def forward(layer, x_BSD):
        b, s, d = x_BSD.shape
        x_TD = x_BSD.reshape(b * s, d)
        gates_TK, experts_TK, _ = layer.router(x_TD)
        y_TD, _ = dispatch.sorted_dispatch(x_TD, gates_TK, experts_TK,
                                           layer.experts.weights(),
                                           gmm_backend=gmm_backend)
        return y_TD.reshape(b, s, d)
    return forward


def bench(name, rounds, tokens=None, with_ragged_dot=True):
    num_experts, top_k, d_model, d_ff, default_tokens = SHAPES[name]
    tokens = tokens or default_tokens
    cfg = moejax.MoEConfig(d_model=d_model, d_ff=d_ff, num_experts=num_experts, top_k=top_k,
                           dispatch="ragged")
    layer = moejax.MoE(cfg, rngs=nnx.Rngs(0))
    dense = SwiGLU(d_model, top_k * d_ff, rngs=nnx.Rngs(0))
    seq = min(tokens, 512)
    x = jax.random.normal(jax.random.key(1), (tokens // seq, seq, d_model), jnp.float32)
    ct = jax.random.normal(jax.random.key(2), x.shape, jnp.float32)
    candidates = {
        "dense": _grad_step(dense, lambda m, x: m(x)),
        "moe": _grad_step(layer, lambda m, x: m(x)[0]),
    }
    if with_ragged_dot:
        candidates["ragged_dot"] = _grad_step(layer, _moe_with_gmm_backend("reference"))
    samples = interleaved_samples({k: (lambda f=f: f(x, ct)) for k, f in candidates.items()},
                                  rounds=rounds)
    print(f"{name}  ({tokens} tokens, fwd+bwd)")
    print(format_table(samples, baseline="dense"))


def bench_shape(name, rounds):
    """Full size; if ragged_dot's backward runs out of memory (it materialises a
    [M, G, ...] intermediate), full size without it and a 16x smaller run with it."""
    try:
        bench(name, rounds)
    except jax.errors.JaxRuntimeError as err:
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        print(f"{name}: ragged_dot ran out of memory at full size; timing it at 1/16 of the tokens")
        bench(name, rounds, with_ragged_dot=False)
        bench(name, rounds, tokens=SHAPES[name][4] // 16)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    print(f"backend: {jax.default_backend()}, devices: {jax.devices()[0].device_kind}")
    for name in args.shapes:
        bench_shape(name, args.rounds)


if __name__ == "__main__":
    main()
