"""``python -m serve trace-sim``: record routing of real generations, replay it under every policy.

Writes to ``--out``: ``trace.npz`` (the recorded RoutingTrace; feed it to
``OffloadConfig(trace=...)`` for 'static' pinning or trace budgets),
``hit_rate.png`` (hit rate against slots per layer, one line per policy),
``table.txt`` and ``sweep.json`` (every row of the sweep).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from serve.offload import record, tracesim

DEFAULT_PROMPTS = [
    "def main(", "import numpy as np\n", "The quick brown fox", "class Model(nn.Module):\n",
    "Once upon a time", "for i in range(10):\n", "# Mixture of experts\n", "SELECT * FROM ",
]


def read_prompts(path: str | None) -> list[str]:
    """One prompt per line (a .json file: a list of strings); the built-in set when None."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    from serve.export import ExportError
    text = Path(path).read_text()
    try:
        prompts = json.loads(text) if path.endswith(".json") else [ln for ln in text.splitlines() if ln]
    except json.JSONDecodeError as err:
        raise ExportError(f"--prompts {path}: not valid JSON ({err})") from None
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ExportError(f"--prompts {path}: need a non-empty list of non-empty prompts")
    return prompts


def run(model, prompts_tokens: list[list[int]], out: Path, *, max_new_tokens: int = 32,
        batch_size: int = 4, chunk: int = 64, expert_bytes: int | None = None, title: str = "",
        slot_counts=None) -> str:
    """Record, sweep, write the files; returns the printed table."""
    out.mkdir(parents=True, exist_ok=True)
    trace = record.record(model, prompts_tokens, max_new_tokens=max_new_tokens,
                          batch_size=batch_size, chunk=chunk)
    trace.save(out / "trace.npz")
    rows = tracesim.sweep(trace, slot_counts=slot_counts)
    table = tracesim.format_table(rows, expert_bytes)
    head = (f"{trace.num_steps} steps, {int(trace.tokens_N.sum())} tokens, {trace.num_layers} MoE "
            f"layers, {trace.num_experts} experts, top-{trace.top_k}\n")
    (out / "table.txt").write_text(head + table + "\n")
    (out / "sweep.json").write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))
    tracesim.plot(rows, out / "hit_rate.png", title=title)
    return head + table


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("trace-sim", help="replay recorded routing under every cache policy")
    p.add_argument("--model", required=True, help="serving checkpoint (or model directory)")
    p.add_argument("--prompts", help="file with one prompt per line (or a JSON list)")
    p.add_argument("--out", default="trace_sim", help="output directory (trace.npz, PNG, table)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per prompt")
    p.add_argument("--batch-size", type=int, default=4, help="prompts per static batch")
    p.add_argument("--chunk", type=int, default=64, help="prefill chunk (tokens per row per step)")
    return p


def load_model(directory: str | Path):
    """(model, tokenizer encode fn) of a serving checkpoint, or of a model directory (with the
    tokenizer export would give it: the one its training named or convert copied; else bytes)."""
    directory = Path(directory)
    if (directory / "manifest.json").is_file():
        from serve.engine import Engine
        engine = Engine.load(directory)
        return engine.model, engine.tokenizer.encode
    from moejax import checkpoint as mckpt
    if not (directory / "model").is_dir():
        from serve.export import ExportError
        raise ExportError(f"--model {directory}: neither a serving checkpoint (manifest.json) nor a "
                          f"model directory (config.json + model/)")
    model, cfg = mckpt.load_model(directory)
    if cfg.scan_layers:     # python -m train's default: unroll (model.layers), as export does
        model = _unrolled(model, cfg)
    from serve.export import find_tokenizer
    from serve.tokenizer import ByteTokenizer, HFTokenizer
    _, tokenizer_file = find_tokenizer(directory, cfg.vocab_size)
    return model, (ByteTokenizer() if tokenizer_file is None else HFTokenizer(tokenizer_file)).encode


def _unrolled(model, cfg):
    """The same model with one Block per layer (``model.layers``) instead of scanned groups."""
    from flax import nnx

    from moejax.layer_stack import unstack_layers
    from moejax.model import Transformer
    flat = cfg.replace(scan_layers=False, remat="none")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(flat, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, unstack_layers(nnx.to_pure_dict(nnx.state(model)), cfg))
    return nnx.merge(graphdef, state)


def expert_bytes(moe) -> int:
    """Bytes of one routed expert as the model holds it: a copy's size host -> device,
    whatever the experts' kind and dtype (int8 weights and their scales in an int8 export)."""
    import jax
    from flax import nnx
    return sum(leaf.nbytes for leaf in jax.tree.leaves(nnx.state(moe.experts))) // moe.cfg.num_experts


def main(args: argparse.Namespace) -> int:
    from serve.export import ExportError
    from serve.offload.offloaded import moe_of
    texts = read_prompts(args.prompts)          # before the model loads: bad prompts fail fast
    model, encode = load_model(args.model)
    moes = [moe_of(b.ffn) for b in model.layers]
    if not any(moes):
        raise ExportError(f"--model {args.model}: no MoE layers to simulate")
    prompts = [encode(p) for p in texts]
    longest, context = max(len(p) for p in prompts), model.cfg.max_seq_len
    if longest + args.max_new_tokens > context:
        raise ExportError(f"--max-new-tokens {args.max_new_tokens}: the longest prompt has {longest} "
                          f"tokens, together past the model's context of {context} tokens")
    moe = next(m[0] for m in moes if m is not None)
    c = moe.cfg
    table = run(model, prompts, Path(args.out), max_new_tokens=args.max_new_tokens,
                batch_size=args.batch_size, chunk=args.chunk, expert_bytes=expert_bytes(moe),
                title=f"{Path(args.model).name}: {c.num_experts} experts, top-{c.top_k}")
    print(table)
    print(f"wrote {args.out}/trace.npz, hit_rate.png, table.txt, sweep.json")
    return 0
