"""Train-step compile time, unrolled vs scanned layers, and peak memory with and without remat.

    PYTHONPATH=. python benchmarks/compile_scan.py [--preset tiny] [--layers 8,16,32]
                                                   [--remat-layers 8] [--batch 16] [--seq 256]

The step is ``python -m train``'s (AdamW, router losses, bias update, finite
guard), lowered from abstract shapes (nothing allocated) and compiled for this
host. Compile time: lower + compile of one step, per depth and layout,
interleaved (one depth's unrolled and scanned compiles back to back).
Memory: ``compiled.memory_analysis()`` of the scanned step for each remat
policy: temp (activations kept for the backward pass and scratch) and the
peak estimate temp + arguments + outputs - aliased.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import ModelConfig, Transformer
from train.config import TrainConfig
from train.optim import make_optimizer
from train.step import split_model, train_step_fn


def compiled_step(cfg: ModelConfig, batch: int, seq: int):
    """(seconds to lower + compile, compiled) for one train step of ``cfg``."""
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, params, nonparam = split_model(abstract)
    tx = make_optimizer(TrainConfig(steps=100), params)
    opt_state = jax.eval_shape(tx.init, params)
    tokens = jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32)
    start = time.perf_counter()
    compiled = jax.jit(train_step_fn(graphdef, tx)).lower(params, opt_state, nonparam, tokens).compile()
    return time.perf_counter() - start, compiled


def memory(compiled) -> tuple[float, float]:
    """(temp MiB, peak MiB estimate) from XLA's memory analysis."""
    m = compiled.memory_analysis()
    peak = m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
    return m.temp_size_in_bytes / 2 ** 20, peak / 2 ** 20


LAYOUTS = ("unrolled", "scanned")


def _cell(value: float, unit: str = "") -> str:
    """A table cell; '-' for a layout that was not compiled (NaN)."""
    return "-" if value != value else f"{value:.1f}{unit}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--layers", default="8,16,32")
    parser.add_argument("--layouts", default="unrolled,scanned", help="which layouts to compile")
    parser.add_argument("--remat-layers", type=int, default=8, help="0: skip the memory table")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args(argv)
    base = ModelConfig.preset(args.preset).replace(max_seq_len=max(args.seq, 256))

    print(f"train-step compile seconds ({args.preset}, batch {args.batch}x{args.seq}, "
          f"{jax.default_backend()}): one lower + compile per cell, a depth's layouts back to back")
    print("| layers | unrolled s | scanned s | unrolled / scanned |")
    print("|---|---|---|---|")
    layouts = args.layouts.split(",")
    if not set(layouts) <= set(LAYOUTS):
        parser.error(f"--layouts: {args.layouts!r}; allowed: a comma-separated subset of "
                     f"{','.join(LAYOUTS)}")
    for n in (int(x) for x in args.layers.split(",") if x):
        cfg = base.replace(n_layers=n)
        secs = {layout: compiled_step(cfg.replace(scan_layers=layout == "scanned"), args.batch,
                                      args.seq)[0] if layout in layouts else float("nan")
                for layout in LAYOUTS}
        print(f"| {n} | {_cell(secs['unrolled'])} | {_cell(secs['scanned'])} | "
              f"{_cell(secs['unrolled'] / secs['scanned'], 'x')} |", flush=True)

    n = args.remat_layers
    if not n:
        return
    print(f"\ntrain-step memory ({args.preset}, {n} layers scanned, batch {args.batch}x{args.seq})")
    print("| remat | temp MiB | peak MiB (temp + args + outputs - aliased) |")
    print("|---|---|---|")
    for remat in ("none", "dots", "full"):
        _, compiled = compiled_step(base.replace(n_layers=n, scan_layers=True, remat=remat),
                                    args.batch, args.seq)
        temp, peak = memory(compiled)
        print(f"| {remat} | {temp:.1f} | {peak:.1f} |", flush=True)


if __name__ == "__main__":
    main()
