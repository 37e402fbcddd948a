"""Cross-device bytes of the expert-parallel dispatch, next to the analytical minimum.

For each mesh, routing pattern and exchange, one forward pass of a sharded MoE
layer reports ``aux['dispatch_bytes']`` (what the exchange moves across
devices, dispatch + return, all token shards) and ``aux['dispatch_min_bytes']``
(the off-device (token, slot) pairs of this routing x D x itemsize x 2). The
table also shows the uniform-routing minimum ``T x K x D x itemsize x (P-1)/P
x 2``. The backward pass moves the same bytes again (the transpose of each
exchange is an exchange of the same size).

    PYTHONPATH=. python benchmarks/ep_dispatch.py [--tokens 2048] [--d-model 256]

On CPU the 'ragged' rows run the all_gather stand-in for ragged_all_to_all;
their byte counts are those of the real collective (payload rows only, plus the
all-gathered per-expert counts), not of the stand-in.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import moejax  # noqa: E402
from moejax import sharding  # noqa: E402

MESHES = ("data=2,expert=4", "expert=8")
EXPERTS = ((8, 2), (64, 8))               # (num_experts, top_k)
EXCHANGES = (("all_to_all", None), ("all_to_all", 1.25), ("ragged", None), ("ragged", 1.25))
SEQ = 512                                 # tokens per sequence: --tokens is a multiple of it


def skew(layer: moejax.MoE) -> None:
    """Uneven routing: feature 0 (shifted +2 in the inputs) pulls tokens to expert 0, then 1."""
    k_DE = np.array(layer.router.kernel[...])
    k_DE[0, 0], k_DE[0, 1] = 4.0, 2.0
    layer.router.kernel[...] = jnp.asarray(k_DE)


def measure(mesh_spec, num_experts, top_k, exchange, factor, routing, args):
    cfg = moejax.MoEConfig(d_model=args.d_model, d_ff=args.d_ff, num_experts=num_experts,
                           top_k=top_k, capacity_factor=factor, ep_exchange=exchange)
    layer = moejax.MoE(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (args.tokens // SEQ, SEQ, args.d_model))
    if routing == "skewed":
        skew(layer)
        x = x.at[..., 0].add(2.0)
    mesh = sharding.make_mesh(mesh_spec)
    with jax.set_mesh(mesh):
        sharding.shard_model(layer, mesh)
        _, aux = nnx.jit(lambda m, x: m(x))(layer, x)
    return {k: float(v) for k, v in aux.items() if k != "expert_load"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help=f"T, a multiple of {SEQ}")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-ff", type=int, default=256)
    args = parser.parse_args()
    if args.tokens <= 0 or args.tokens % SEQ:
        # the batch is [tokens / SEQ, SEQ]: a remainder would be dropped while T and the
        # uniform minimum below still counted it
        parser.error(f"--tokens must be a positive multiple of {SEQ}, got {args.tokens}")
    print(f"jax {jax.__version__}, {jax.device_count()} {jax.default_backend()} devices, "
          f"T={args.tokens} tokens, D={args.d_model}, float32; forward pass, MB = 1e6 bytes")
    header = ("| mesh | E, K | routing | exchange | bytes MB | min (routing) MB | "
              "min (uniform) MB | bytes / min | dropped |")
    print(header)
    print("|---|---|---|---|---:|---:|---:|---:|---:|")
    for mesh_spec in MESHES:
        ep = sharding.parse_mesh_spec(mesh_spec)["expert"]
        for num_experts, top_k in EXPERTS:
            uniform = args.tokens * top_k * args.d_model * 4 * (ep - 1) / ep * 2
            for routing in ("random", "skewed"):
                for exchange, factor in EXCHANGES:
                    aux = measure(mesh_spec, num_experts, top_k, exchange, factor, routing, args)
                    name = exchange + (f" cf={factor}" if factor else " dropless")
                    ratio = aux["dispatch_bytes"] / max(aux["dispatch_min_bytes"], 1.0)
                    print(f"| {mesh_spec} | {num_experts}, {top_k} | {routing} | {name} | "
                          f"{aux['dispatch_bytes'] / 1e6:.2f} | {aux['dispatch_min_bytes'] / 1e6:.2f} | "
                          f"{uniform / 1e6:.2f} | {ratio:.2f}x | {aux['dropped_fraction']:.1%} |",
                          flush=True)


if __name__ == "__main__":
    main()
