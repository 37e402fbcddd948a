"""Kernel benchmarks: achieved TFLOP/s of each kernel next to its baselines, in one run.

    PYTHONPATH=. python benchmarks/kernels.py --op gmm            # or --op all
    PYTHONPATH=. python benchmarks/kernels.py --op embedding_bag [flags of
        benchmarks/kernels_embedding_bag.py: --rows --dim --tokens --k --dtype ...]

One function per op (``bench_<op>``); each times its candidates interleaved,
round by round, and reports medians, so a noisy shared machine skews every
candidate alike. On CPU the Pallas kernels only run in interpret mode (not a
performance path), so 'auto' picks the XLA path there.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import kernels_embedding_bag
from benchmarks.timing import interleaved_medians
from kernels_pallas.gmm import gmm


def _print_table(title, flops, seconds, baseline):
    print(f"\n{title}")
    print(f"{'candidate':<30}{'ms':>10}{'TFLOP/s':>10}  speed vs {baseline}")
    for name, sec in seconds.items():
        print(f"{name:<30}{sec * 1e3:>10.3f}{flops / sec / 1e12:>10.4f}  "
              f"{seconds[baseline] / sec:.2f}x")


def bench_gmm(args):
    """gmm vs a dense matmul of equal FLOPs vs jax.lax.ragged_dot, balanced routing."""
    m, k, n, g = args.tokens, args.d_model, args.d_ff, args.experts
    on_accelerator = jax.default_backend() in ("tpu", "gpu")
    dtype = jnp.dtype(args.dtype or ("bfloat16" if on_accelerator else "float32"))
    backend = args.backend
    rng = np.random.default_rng(0)
    lhs_MK = jnp.asarray(rng.standard_normal((m, k)), dtype)
    rhs_GKN = jnp.asarray(rng.standard_normal((g, k, n)) / np.sqrt(k), dtype)
    dense_KN = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), dtype)
    sizes_G = jnp.full((g,), m // g, jnp.int32).at[-1].add(m % g)   # balanced routing

    fns = {
        f"gmm (backend={backend})": jax.jit(lambda a, b, s: gmm(a, b, s, backend=backend)),
        "dense matmul (same FLOPs)": jax.jit(lambda a, b: jnp.einsum("mk,kn->mn", a, b)),
        "jax.lax.ragged_dot": jax.jit(jax.lax.ragged_dot),
    }
    args_by_name = {name: (lhs_MK, rhs_GKN, sizes_G) for name in fns}
    args_by_name["dense matmul (same FLOPs)"] = (lhs_MK, dense_KN)
    if args.grad:
        def loss(fn):
            return lambda *xs: jnp.sum(fn(*xs).astype(jnp.float32))
        fns = {name: jax.jit(jax.grad(loss(fn), argnums=(0, 1))) for name, fn in fns.items()}
    seconds = interleaved_medians(
        {name: (lambda fn=fn, a=args_by_name[name]: fn(*a)) for name, fn in fns.items()},
        rounds=args.rounds)
    flops = 2 * m * k * n * (3 if args.grad else 1)
    what = "forward+backward" if args.grad else "forward"
    _print_table(f"gmm {what}: M={m} K={k} N={n} G={g} {dtype.name} on "
                 f"{jax.devices()[0].device_kind} ({jax.default_backend()}), "
                 f"median of {args.rounds} interleaved rounds", flops, seconds, "dense matmul (same FLOPs)")


OPS = {"gmm": bench_gmm}


def main(argv=None):
    op_parser = argparse.ArgumentParser(add_help=False)
    op_parser.add_argument("--op", choices=[*OPS, "embedding_bag", "all"], default="all")
    op, rest = op_parser.parse_known_args(argv)
    if op.op == "embedding_bag":  # its own flags (GB/s vs an XLA gather + sum)
        return kernels_embedding_bag.main(rest)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--op", choices=[*OPS, "embedding_bag", "all"], default="all",
                        help="'all' also runs embedding_bag at its default shapes")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on TPU/GPU, else float32")
    parser.add_argument("--grad", action="store_true", help="time forward+backward")
    gmm_args = parser.add_argument_group("gmm")
    gmm_args.add_argument("--tokens", type=int, default=None, help="M (rows routed)")
    gmm_args.add_argument("--d-model", type=int, default=None, help="K")
    gmm_args.add_argument("--d-ff", type=int, default=None, help="N")
    gmm_args.add_argument("--experts", type=int, default=8, help="G")
    gmm_args.add_argument("--backend", default="auto", help="gmm backend")
    # parsed before anything runs: --help or a bad flag must not wait for a benchmark first
    args = parser.parse_args(argv)
    if args.op == "all":
        kernels_embedding_bag.main([])
    big = jax.default_backend() in ("tpu", "gpu")
    args.tokens = args.tokens or (16384 if big else 2048)
    args.d_model = args.d_model or (4096 if big else 512)
    args.d_ff = args.d_ff or (4096 if big else 1024)
    for name, bench in OPS.items():
        if args.op in (name, "all"):
            bench(args)


if __name__ == "__main__":
    main()
