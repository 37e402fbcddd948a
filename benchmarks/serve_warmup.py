"""Start-up of ``serve.Engine``: compiling every step shape one by one vs side by side.

``Engine.warmup()`` compiles the step for every (row bucket, width bucket); a
server calls it before taking requests. "one by one" calls each idle step in
turn (each traces, lowers and compiles before the next starts: what warmup did
before); "side by side" is ``Engine.warmup()`` (``serve.runner.precompile``:
each shape compiles on a pool thread while the next one lowers). Every round
drops JAX's caches first, so both compile from scratch; rounds interleaved,
medians; ratio = side by side / one by one (below 1: faster).

    PYTHONPATH=. python benchmarks/serve_warmup.py [--preset tiny --slots 8 --chunk 64 --rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics

import jax
from flax import nnx

import moejax
from benchmarks.timing import interleaved_samples
from serve import Engine
from serve.tokenizer import ByteTokenizer


def one_by_one(engine: Engine) -> None:
    for rows, width in engine.step_shapes():
        next_B, engine._runner_state = engine._step_fn(*engine._idle_step_args(rows, width))
        jax.block_until_ready(next_B)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny", choices=moejax.ModelConfig.preset_names())
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cfg = moejax.ModelConfig.preset(args.preset)
    engine = Engine(moejax.Transformer(cfg, rngs=nnx.Rngs(0)), ByteTokenizer(), num_slots=args.slots,
                    max_chunk=args.chunk)
    print(f"{args.preset}: {len(engine.step_shapes())} step shapes (rows {engine.scheduler.row_buckets} x widths "
          f"{engine.scheduler.buckets}), {os.cpu_count()} CPUs, {jax.devices()[0].platform}")

    def fresh(fn):
        def run():
            jax.clear_caches()
            fn()
        return run

    samples = interleaved_samples({"one by one": fresh(lambda: one_by_one(engine)),
                                   "side by side": fresh(engine.warmup)}, rounds=args.rounds, warmup=0)
    medians = {name: statistics.median(s) for name, s in samples.items()}
    for name, median in medians.items():
        print(f"{name:>13}: {median:6.1f} s  (rounds: {', '.join(f'{s:.1f}' for s in samples[name])})")
    print(f"side by side / one by one: {medians['side by side'] / medians['one by one']:.2f}x")


if __name__ == "__main__":
    main()
