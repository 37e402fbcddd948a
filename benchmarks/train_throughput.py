"""Training throughput: the tiny MoE preset next to the dense model with the same
active parameters (``dense-tiny``), measured in one process, interleaved.

Both models run the exact train step of ``python -m train`` (loss + router
losses, AdamW, bias update, finite guard; jitted, state donated) on batches of
the built-in corpus. Each round times ``--steps-per-round`` steps of every
model in turn (the order alternates between rounds); the table shows median
and best tokens/s over the rounds and the MoE / dense ratio.

    PYTHONPATH=. python benchmarks/train_throughput.py [--batch-size 16 --seq-len 128]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np
from flax import nnx

import moejax
from train import data as data_lib
from train.config import TrainConfig
from train.optim import make_optimizer
from train.state import parameter_counts
from train.step import split_model, train_step_fn


def build(preset: str, cfg: TrainConfig):
    model_cfg = moejax.ModelConfig.preset(preset)
    if cfg.dtype:
        model_cfg = model_cfg.with_compute_dtype(cfg.dtype)
    graphdef, params, nonparam = split_model(moejax.Transformer(model_cfg, rngs=nnx.Rngs(0)))
    tx = make_optimizer(cfg, params)
    step = jax.jit(train_step_fn(graphdef, tx), donate_argnums=(0, 1, 2))
    return {"name": preset, "cfg": model_cfg, "step": step,
            "state": [params, tx.init(params), nonparam], "rates": [], "cpu": []}


def run_steps(entry, batches) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    for batch in batches:
        *entry["state"], metrics = entry["step"](*entry["state"], batch)
    jax.block_until_ready(metrics)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="tiny,dense-tiny")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps-per-round", type=int, default=3)
    p.add_argument("--dtype", choices=("float32", "bfloat16"))
    args = p.parse_args()
    cfg = TrainConfig(batch_size=args.batch_size, seq_len=args.seq_len, dtype=args.dtype)
    files = data_lib.stdlib_files()[:200]  # a few MB is plenty for throughput
    corpus = data_lib.load_text(files, data_lib._TextEncoder(None), "stdlib sample")
    sampler = data_lib.BatchSampler(corpus.train, cfg.batch_size, cfg.seq_len, seed=0)
    entries = [build(name, cfg) for name in args.presets.split(",")]
    tokens = cfg.batch_size * cfg.seq_len * args.steps_per_round

    for entry in entries:  # compile + warm up
        run_steps(entry, [jax.numpy.asarray(sampler.batch(i)) for i in range(2)])
    for r in range(args.rounds):
        batches = [jax.numpy.asarray(sampler.batch(100 + r * args.steps_per_round + i))
                   for i in range(args.steps_per_round)]
        order = entries if r % 2 == 0 else entries[::-1]
        for entry in order:
            wall, cpu = run_steps(entry, batches)
            entry["rates"].append(tokens / wall)
            entry["cpu"].append(cpu / args.steps_per_round)

    print(f"train throughput, {jax.default_backend()} ({jax.device_count()} device), batch "
          f"{cfg.batch_size}x{cfg.seq_len}, {args.rounds} interleaved rounds (order alternating) x "
          f"{args.steps_per_round} steps, "
          f"compute {cfg.dtype or 'float32'}")
    print(f"{'preset':<12} {'params':>8} {'active':>8} {'median tok/s':>13} {'best tok/s':>11} "
          f"{'cpu s/step':>11}")
    for e in entries:
        total, active = parameter_counts(e["cfg"], e["state"][0])
        print(f"{e['name']:<12} {total / 1e6:>7.2f}M {active / 1e6:>7.2f}M "
              f"{statistics.median(e['rates']):>13,.0f} {max(e['rates']):>11,.0f} "
              f"{statistics.median(e['cpu']):>11.3f}")
    if len(entries) == 2:
        (a, b) = entries
        ratios = [x / y for x, y in zip(a["rates"], b["rates"])]
        print(f"{a['name']} / {b['name']}: median of per-round ratios {statistics.median(ratios):.3f}, "
              f"ratio of bests {max(a['rates']) / max(b['rates']):.3f} (target >= 0.75)")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
