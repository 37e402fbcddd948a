"""Grouped matmul on CPU: the XLA tile loop vs jax.lax.ragged_dot vs a dense matmul.

Each candidate runs an SwiGLU expert FFN, forward and backward (gradients
w.r.t. the tokens and all three weights):

    h = silu(x @ w1[g]) * (x @ w3[g]);  y = h @ w2[g]      (D->F, D->F, F->D)

'dense' does the same three matmuls with one weight each ([D,F], [F,D]) on the
same M rows: same FLOPs, no grouping; it is the speed to aim for. Group sizes
come from routing each token to top_k distinct experts drawn at random.

    PYTHONPATH=. python benchmarks/gmm_cpu.py            # both target shapes
    PYTHONPATH=. python benchmarks/gmm_cpu.py --min-tile-rows 32 --ragged-rounds 0
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import format_table, interleaved_samples
from kernels_pallas.gmm.xla import gmm_xla, tile_sizes

SHAPES = {  # name: (experts E, top_k, d_model D, d_ff F, tokens)
    "E8-k2-D512-F1024": (8, 2, 512, 1024, 8192),
    "E64-k8-D512-F256": (64, 8, 512, 256, 8192),
}
RAGGED_DIVISOR = {"E8-k2-D512-F1024": 1, "E64-k8-D512-F256": 16}  # see bench_shape


def routed_group_sizes(num_experts, top_k, tokens, seed=0) -> np.ndarray:
    """Rows per expert when every token picks top_k distinct experts at random."""
    rng = np.random.default_rng(seed)
    picks = np.argsort(rng.random((tokens, num_experts)), axis=1)[:, :top_k]
    return np.bincount(picks.ravel(), minlength=num_experts).astype(np.int32)


def swiglu(matmul, x_MD, w1, w3, w2):
    h_MF = jax.nn.silu(matmul(x_MD, w1)) * matmul(x_MD, w3)
    return matmul(h_MF, w2)


def fwd_bwd(matmul):
    """jit(x, weights, cotangent) -> (y, dx, dw1, dw3, dw2) for the given matmul."""
    def run(x_MD, w1, w3, w2, ct_MD):
        y_MD, vjp = jax.vjp(lambda *a: swiglu(matmul, *a), x_MD, w1, w3, w2)
        return y_MD, vjp(ct_MD)
    return jax.jit(run)


def compiled(jitted, args):
    executable = jitted.lower(*args).compile()
    return lambda: executable(*args)


def make_problem(num_experts, top_k, d_model, d_ff, tokens):
    rows = tokens * top_k
    sizes_G = jnp.asarray(routed_group_sizes(num_experts, top_k, tokens))
    keys = jax.random.split(jax.random.key(0), 5)
    x_MD = jax.random.normal(keys[0], (rows, d_model), jnp.float32)
    ct_MD = jax.random.normal(keys[1], (rows, d_model), jnp.float32)
    w1_EDF, w3_EDF = (jax.random.normal(k, (num_experts, d_model, d_ff)) * d_model**-0.5
                      for k in keys[2:4])
    w2_EFD = jax.random.normal(keys[4], (num_experts, d_ff, d_model)) * d_ff**-0.5
    return sizes_G, (x_MD, w1_EDF, w3_EDF, w2_EFD, ct_MD)


def compiled_runs(sizes_G, grouped_args, tiles, with_ragged):
    """Zero-argument callables; compiled ahead, so slow ones need no untimed warm-up call."""
    x_MD, w1_EDF, w3_EDF, w2_EFD, ct_MD = grouped_args
    dense_args = (x_MD, w1_EDF[0], w3_EDF[0], w2_EFD[0], ct_MD)
    grouped = {"xla_gmm": lambda a, w: gmm_xla(a, w, sizes_G, **tiles)}
    if with_ragged:
        grouped["ragged_dot"] = lambda a, w: jax.lax.ragged_dot(a, w, sizes_G)
    runs = {"dense": compiled(fwd_bwd(lambda a, w: a @ w), dense_args)}
    for label, mm in grouped.items():
        runs[label] = compiled(fwd_bwd(mm), grouped_args)
    return runs


def time_runs(runs, rounds, ragged_rounds):
    """Interleaved samples; ragged_dot (many times slower) gets its own few rounds with
    dense, and its samples are scaled by dense's median ratio between the two sessions."""
    samples = interleaved_samples({k: v for k, v in runs.items() if k != "ragged_dot"},
                                  rounds=rounds)
    if "ragged_dot" in runs:
        slow = interleaved_samples({"dense": runs["dense"], "ragged_dot": runs["ragged_dot"]},
                                   rounds=ragged_rounds, warmup=0)
        scale = np.median(samples["dense"]) / np.median(slow["dense"])
        samples["ragged_dot"] = [t * scale for t in slow["ragged_dot"]]
    return samples


def report(samples, flops):
    print(format_table(samples, "dense"))
    medians = {name: float(np.median(s)) for name, s in samples.items()}
    if "ragged_dot" in medians:
        print(f"  ragged_dot / xla_gmm (medians): {medians['ragged_dot'] / medians['xla_gmm']:.1f}x")
    print(f"  dense: {flops / medians['dense'] / 1e9:.0f} GFLOP/s")


def bench_shape(name, tiles, rounds, ragged_rounds, ragged_divisor):
    num_experts, top_k, d_model, d_ff, tokens = SHAPES[name]
    rows = tokens * top_k
    flops = 3 * 3 * 2 * rows * d_model * d_ff  # 3 matmuls, each 1 fwd + 2 bwd
    sizes_G, args = make_problem(*SHAPES[name])
    print(f"\n{name}: M={rows} rows, G={num_experts}, tile sizes {tile_sizes(rows, **tiles)}, "
          f"sizes min/max={int(sizes_G.min())}/{int(sizes_G.max())}, "
          f"{flops / 1e9:.0f} GFLOP per fwd+bwd")
    runs = compiled_runs(sizes_G, args, tiles, with_ragged=ragged_rounds and ragged_divisor == 1)
    report(time_runs(runs, rounds, ragged_rounds), flops)
    if ragged_rounds and ragged_divisor > 1:
        # ragged_dot's backward on XLA:CPU allocates [G, M, ...] buffers (43 GB here):
        # compare the three at 1/divisor of the tokens instead.
        small = tokens // ragged_divisor
        print(f"  ragged_dot does not fit in memory at this size; all three at {small} tokens:")
        sizes_G, args = make_problem(num_experts, top_k, d_model, d_ff, small)
        runs = compiled_runs(sizes_G, args, tiles, with_ragged=True)
        report(time_runs(runs, rounds, ragged_rounds), flops // ragged_divisor)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), action="append")
    parser.add_argument("--min-tile-rows", type=int, default=None)
    parser.add_argument("--max-tile-rows", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--ragged-rounds", type=int, default=1,
                        help="timed calls of ragged_dot (minutes each on 2 cores); 0 skips it")
    args = parser.parse_args()
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, float32, fwd+bwd SwiGLU FFN")
    for name in args.shape or SHAPES:
        tiles = {"min_tile_rows": args.min_tile_rows, "max_tile_rows": args.max_tile_rows}
        bench_shape(name, tiles, args.rounds, args.ragged_rounds, RAGGED_DIVISOR[name])


if __name__ == "__main__":
    main()
