"""Decode speed and bytes moved per token with routed experts offloaded, one run.

Candidates, all through ``serve.Engine`` on the same checkpoint, greedy, the
same prompts, timed interleaved (benchmarks/timing.py):
  resident           the engine's own jitted step, every expert on the device
  slots=E host       the offloaded layer-by-layer path with every expert in a slot
                     (its Python per-layer overhead, no copies once warm)
  50% / 25% host|disk  slots per layer = E/2, E/4; default policy (lfru) + prefetch
  every-time host|disk  E/4 slots, forgotten every step: every needed expert copied
Reported: decode tokens/s (median over rounds; generated tokens / wall time of
a generate call, prompts short so decode dominates), host->device and
disk->host bytes per token, hit rate.

    PYTHONPATH=. python benchmarks/serve_offload.py --model serving/tiny
    PYTHONPATH=. python benchmarks/serve_offload.py            # random tiny preset
    PYTHONPATH=. python benchmarks/serve_offload.py --quantize int8   # the same, int8 experts
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from flax import nnx

import moejax
import serve
from benchmarks.timing import interleaved_samples
from moejax import checkpoint as mckpt

PROMPTS = ["def main(", "import os\n", "The model", "class A:"]


def random_checkpoint(root: Path, preset: str, quantize: str | None) -> Path:
    cfg = moejax.ModelConfig.preset(preset)
    model = moejax.Transformer(cfg, rngs=nnx.Rngs(0))
    mckpt.save_model(root / "run", model, cfg)
    serve.export(root / "run", root / "serving", quantize=quantize)
    return root / "serving"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="serving checkpoint (default: a random --preset model)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--quantize", choices=("int8",), help="export the random model with int8 experts")
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    args = p.parse_args()
    if args.model and args.quantize:
        p.error("--quantize applies to the random --preset model; --model is used as exported")
    tmp = tempfile.TemporaryDirectory()
    path = Path(args.model) if args.model else random_checkpoint(Path(tmp.name), args.preset, args.quantize)
    kw = dict(num_slots=args.batch, max_len=128, max_chunk=16)
    cfg = serve.Engine.load(path, **kw).cfg
    num_experts, top_k = cfg.moe.num_experts, cfg.moe.top_k
    quarter, half = max(num_experts // 4, 1), max(num_experts // 2, 1)
    engines = {"resident": serve.Engine.load(path, **kw)}
    offload = {
        "slots=E host": dict(slots_per_layer=num_experts),
        "50% host": dict(slots_per_layer=half),
        "25% host": dict(slots_per_layer=quarter),
        "every-time host": dict(slots_per_layer=quarter, prefetch=False),
        "50% disk": dict(slots_per_layer=half, store="disk"),
        "25% disk": dict(slots_per_layer=quarter, store="disk"),
        "every-time disk": dict(slots_per_layer=quarter, prefetch=False, store="disk"),
    }
    for name, c in offload.items():
        engines[name] = serve.Engine.load(path, offload=serve.OffloadConfig(**c), **kw)
        if name.startswith("every-time"):
            engines[name].offloaded.reuse = False
    prompts = (PROMPTS * args.batch)[:args.batch]
    outs = {}

    def run(name):
        def call():
            outs[name] = engines[name].generate(prompts, max_new_tokens=args.new_tokens)
            return 0
        return call

    start = time.perf_counter()
    samples = interleaved_samples({n: run(n) for n in engines}, rounds=args.rounds, warmup=1)
    ref = [o.tokens for o in outs["resident"]]
    print(f"model {path} ({cfg.name}): {num_experts} experts top-{top_k}, {cfg.num_moe_layers} MoE layers; "
          f"batch {args.batch}, {args.new_tokens} new tokens, {args.rounds} interleaved rounds "
          f"({time.perf_counter() - start:.0f} s); tok/s = generated tokens / median generate time")
    print(f"  {'candidate':<16} {'tok/s':>8} {'ratio':>6} {'H2D KiB/tok':>12} {'disk KiB/tok':>13} "
          f"{'hit rate':>9} {'same tokens':>12}")
    # a request that meets EOS generates fewer than --new-tokens: count what came out
    tokens = {name: sum(len(o.tokens) for o in out) for name, out in outs.items()}
    base = tokens["resident"] / np.median(samples["resident"])
    for name, engine in engines.items():
        rate = tokens[name] / np.median(samples[name])
        figures = engine.stats().get("expert_store", {})
        h2d = figures.get("bytes_host_to_device_per_token", 0) / 1024
        disk = figures.get("bytes_disk_to_host_per_token", 0) / 1024
        hit = figures.get("hit_rate", float("nan"))
        same = [o.tokens for o in outs[name]] == ref
        print(f"  {name:<16} {rate:8.1f} {rate / base:5.2f}x {h2d:12.1f} {disk:13.1f} {hit:9.3f} {same!s:>12}")


if __name__ == "__main__":
    main()
