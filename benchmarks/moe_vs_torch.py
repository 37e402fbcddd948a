"""One MoE layer, forward + backward, moejax vs transformers (PyTorch) vs a dense FFN, on CPU.

Candidates, timed interleaved in one process (each round runs every one once,
medians over rounds), all on the same weights and inputs:

  moejax          moejax.MoE, dispatch='ragged' (the CPU default)
  dense_ffn       moejax's dense SwiGLU FFN of width top_k * d_ff: the same active FLOPs
  torch_grouped   transformers Qwen3-MoE sparse block, experts_implementation='grouped_mm'
  torch_eager     the same block, experts_implementation='eager' (loop over experts)
  jax_matmul      one [n, n] @ [n, n] in JAX (the practical peak; --peak-n)
  torch_matmul    the same in torch

Forward + backward = gradients of sum(y * ct) w.r.t. the input and every
parameter. Torch runs with as many threads as JAX's CPU client (one per core);
it comes from the optional 'hf' extra, and without it the torch columns are
skipped. GFLOP/s counts 18*T*k*D*F (three matmuls, forward and two backward)
plus the router's 6*T*D*E; '%peak' divides by the same framework's matmul
rate measured in the same rounds. CPU seconds (all threads) are printed too:
on a machine shared with other work they track the work done where wall time
also counts the waits for a core.

--malloc-tuning reruns the process with GLIBC_TUNABLES=MALLOC_TUNING: glibc
then reuses freed memory instead of returning large blocks to the kernel, so
the buffers XLA and torch allocate on every call are not page-faulted and
zeroed again. It speeds up both frameworks (torch more); it is a property of
the process, so the library never sets it (see README, "CPU performance").

    PYTHONPATH=. python benchmarks/moe_vs_torch.py                  # float32, all shapes
    PYTHONPATH=. python benchmarks/moe_vs_torch.py --dtype bfloat16 --rounds 5
    PYTHONPATH=. python benchmarks/moe_vs_torch.py --malloc-tuning
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import moejax
from benchmarks import torch_moe
from benchmarks.moe_layer import _grad_step
from benchmarks.timing import interleaved_samples
from moejax.moe import SwiGLU

SHAPES = {  # name: (tokens T, d_model D, d_ff F, experts E, top_k k)
    "T8192-D512-F1024-E8-k2": (8192, 512, 1024, 8, 2),
    "T8192-D512-F256-E64-k8": (8192, 512, 256, 64, 8),
    "T2048-D1024-F512-E32-k4": (2048, 1024, 512, 32, 4),
}


def layer_flops(tokens, d_model, d_ff, num_experts, top_k) -> float:
    return 18.0 * tokens * top_k * d_model * d_ff + 6.0 * tokens * d_model * num_experts


MALLOC_TUNING = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2000000000"


def _matmul(a, b):
    """The peak: a @ b accumulated in float32 (for bf16, XLA:CPU's bf16 kernel)."""
    return jnp.dot(a, b, preferred_element_type=jnp.float32).astype(a.dtype)


def jax_candidates(shape, dtype, x, ct, peak_n):
    tokens, d_model, d_ff, num_experts, top_k = shape
    cfg = moejax.MoEConfig(d_model=d_model, d_ff=d_ff, num_experts=num_experts, top_k=top_k,
                           dispatch="ragged", dtype=dtype)
    layer = moejax.MoE(cfg, rngs=nnx.Rngs(0))
    dense = SwiGLU(d_model, top_k * d_ff, rngs=nnx.Rngs(0), dtype=jnp.dtype(dtype))
    moe_step = _grad_step(layer, lambda m, x: m(x)[0])
    dense_step = _grad_step(dense, lambda m, x: m(x))
    a = jnp.ones((peak_n, peak_n), dtype)
    matmul = jax.jit(_matmul)
    return layer, {"moejax": lambda: moe_step(x, ct), "dense_ffn": lambda: dense_step(x, ct),
                   "jax_matmul": lambda: matmul(a, a)}


def torch_candidates(layer, dtype, x, ct, peak_n):
    """Torch steps (return None: torch runs synchronously) and the forward's max |diff|."""
    steps, diffs = {}, {}
    y_jax = np.asarray(layer(x)[0], np.float32)
    for label, impl in (("torch_grouped", "grouped_mm"), ("torch_eager", "eager")):
        block = torch_moe.moe_block(layer, impl, dtype)
        err = np.abs(torch_moe.forward(block, x, dtype) - y_jax)
        diffs[label] = (float(np.max(err)), float(np.mean(err) / np.mean(np.abs(y_jax))))
        step = torch_moe.grad_step(block, x, ct, dtype)
        steps[label] = lambda step=step: step()
    mm = torch_moe.matmul(peak_n, dtype)
    steps["torch_matmul"] = lambda: (mm(), None)[1]
    return steps, diffs


def report(name, shape, samples, cpu, peak_n):
    flops = layer_flops(*shape)
    med = {k: float(np.median(v)) for k, v in samples.items()}
    med_cpu = {k: float(np.median(v)) for k, v in cpu.items()}
    peak = {fw: 2.0 * peak_n ** 3 / med[f"{fw}_matmul"] for fw in ("jax", "torch") if f"{fw}_matmul" in med}
    tokens, d_model, d_ff, num_experts, top_k = shape
    print(f"\n{name}: {tokens * top_k // num_experts} rows per expert on average, "
          f"{flops / 1e9:.1f} GFLOP per fwd+bwd")
    print(f"  {'':14}  {'median':>9}  {'/dense':>6}  {'/moejax':>7}  {'GFLOP/s':>7}  {'%peak':>5}"
          f"  {'CPU s':>6}  {'CPU /dense':>10}")
    for label in samples:
        if label.endswith("_matmul"):
            rate = peak[label.split("_")[0]]
            print(f"  {label:14}  {med[label] * 1e3:6.0f} ms  {'':>6}  {'':>7}  {rate / 1e9:7.0f}"
                  f"  {'':>5}  {med_cpu[label]:6.2f}   ({peak_n}^3 matmul)")
            continue
        rate = flops / med[label]
        fw = "torch" if label.startswith("torch") else "jax"
        print(f"  {label:14}  {med[label] * 1e3:6.0f} ms  {med[label] / med['dense_ffn']:5.2f}x"
              f"  {med[label] / med['moejax']:6.2f}x  {rate / 1e9:7.0f}  {100 * rate / peak[fw]:4.0f}%"
              f"  {med_cpu[label]:6.2f}  {med_cpu[label] / med_cpu['dense_ffn']:9.2f}x")


def bench(name, dtype, rounds, peak_n, with_torch):
    shape = SHAPES[name]
    tokens, d_model = shape[:2]
    seq = min(tokens, 512)
    x = jax.random.normal(jax.random.key(1), (tokens // seq, seq, d_model), jnp.float32)
    ct = jax.random.normal(jax.random.key(2), x.shape, jnp.float32)
    layer, candidates = jax_candidates(shape, dtype, x, ct, peak_n)
    if with_torch:
        steps, diffs = torch_candidates(layer, dtype, x, ct, peak_n)
        candidates.update(steps)
        # bfloat16: torch routes on bf16 logits, moejax on float32 ones, so near-ties pick
        # other experts for a few tokens (large max, small mean)
        print(f"\n{name}: |y_torch - y_moejax| (forward, {dtype}), max / mean relative to mean |y|: "
              + ", ".join(f"{k} {a:.1e} / {r:.1e}" for k, (a, r) in diffs.items()))
    cpu = {}
    samples = interleaved_samples(candidates, rounds=rounds, cpu_samples=cpu)
    report(name, shape, samples, cpu, peak_n)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--peak-n", type=int, default=2048, help="size of the peak matmul")
    parser.add_argument("--no-torch", action="store_true", help="skip the torch columns")
    parser.add_argument("--malloc-tuning", action="store_true",
                        help="rerun with GLIBC_TUNABLES=MALLOC_TUNING (see above)")
    args = parser.parse_args()
    if args.malloc_tuning and os.environ.get("GLIBC_TUNABLES") != MALLOC_TUNING:
        os.execve(sys.executable, [sys.executable, *sys.argv],
                  {**os.environ, "GLIBC_TUNABLES": MALLOC_TUNING})
    missing = "--no-torch given" if args.no_torch else torch_moe.available()
    threads = len(os.sched_getaffinity(0))  # XLA:CPU runs one intra-op thread per usable core
    print(f"jax {jax.__version__} on {jax.default_backend()} ({threads} cores), {args.dtype}, "
          f"forward + backward, medians of {args.rounds} interleaved rounds, "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}")
    if missing:
        print(f"torch columns skipped: {missing}")
    else:
        import torch
        import transformers
        torch.set_num_threads(threads)
        print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
              f"transformers {transformers.__version__}")
    for name in args.shapes:
        bench(name, args.dtype, args.rounds, args.peak_n, with_torch=not missing)


if __name__ == "__main__":
    main()
