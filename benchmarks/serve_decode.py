"""Decode speed of ``serve.Engine`` next to ``transformers`` ``generate`` on the same weights.

One run, on CPU:
1. A randomly initialised ~100M-parameter Mixtral (8 experts, top-2) is written
   with ``transformers``, converted with ``moejax.convert``, exported with
   ``serve.export`` and loaded with ``serve.Engine.load``.
2. Greedy decoding at batch 1 and 8 from the same random prompts: tokens must be
   identical; decode tokens/s = (new tokens after the first) / (time after the
   first), from runs of N and of 1 new tokens, both engines the same way, rounds
   interleaved (medians). torch uses as many threads as XLA:CPU (all cores).
3. Continuous batching: a 16-slot engine in its background thread, clients at
   concurrency 1, 4, 16 each sending requests back to back: generated tokens/s.
   ``--parts rows``: one lone request on a 16-slot engine with row buckets (the
   step covers the busy slots only) and without (all 16 rows), against a 1-slot
   engine, interleaved: tokens/s.
4. Batch-1 decode as achieved GB/s of weights read per token (attention, dense
   parts, top_k of E experts per MoE layer, the LM head) next to the measured
   memory read bandwidth of the machine.

    PYTHONPATH=. python benchmarks/serve_decode.py [--new-tokens 32 --rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

PROMPT_LEN = 16
PARTS = ("decode", "rows", "batching")
MAX_NEW_TOKENS = 128   # the engines' max_len is PROMPT_LEN + this


def build_hf(directory: Path, seed: int = 0):
    import torch
    import transformers
    config = transformers.MixtralConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=1024, num_hidden_layers=6,
        num_attention_heads=8, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=512, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    model = transformers.MixtralForCausalLM(config).eval()
    with torch.no_grad():                       # spread logits so greedy ties are rare
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.05)
    model.save_pretrained(directory / "hf")
    return model


def to_engine(hf_dir: Path, work: Path, num_slots: int, row_buckets: bool = True):
    import moejax
    from moejax.checkpoint import save_model
    from serve import Engine, export
    if not (work / "serving").exists():
        model, cfg = moejax.convert.load_hf(hf_dir)
        save_model(work / "run", model, cfg)
        export(work / "run", work / "serving")
    return Engine.load(work / "serving", num_slots=num_slots, max_len=PROMPT_LEN + MAX_NEW_TOKENS, max_chunk=PROMPT_LEN,
                       row_buckets=row_buckets)


def hf_generate(model, prompts: np.ndarray, n: int) -> np.ndarray:
    import torch
    with torch.no_grad():
        out = model.generate(torch.as_tensor(prompts), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             attention_mask=torch.ones(prompts.shape, dtype=torch.long), pad_token_id=0)
    return out[:, prompts.shape[1]:].numpy()


def engine_generate(engine, prompts: np.ndarray, n: int) -> np.ndarray:
    outs = engine.generate([list(map(int, p)) for p in prompts], max_new_tokens=n)
    return np.array([o.tokens for o in outs])


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def decode_table(hf_model, engines: dict, new_tokens: int, rounds: int) -> dict:
    rng = np.random.default_rng(0)
    results = {}
    prompts = {b: rng.integers(0, 32000, size=(b, PROMPT_LEN)) for b in engines}
    for b, engine in engines.items():          # warm up (compile) and check tokens once
        theirs = hf_generate(hf_model, prompts[b], new_tokens)
        ours = engine_generate(engine, prompts[b], new_tokens)
        results[b] = {"same_tokens": bool((theirs == ours).all()),
                      "agree": float((theirs == ours).mean()), "hf": [], "engine": []}
    for r in range(rounds):
        for b, engine in engines.items():
            order = [("hf", lambda n: hf_generate(hf_model, prompts[b], n)),
                     ("engine", lambda n: engine_generate(engine, prompts[b], n))]
            for name, fn in (order if r % 2 == 0 else order[::-1]):
                t_n, _ = timed(lambda: fn(new_tokens))
                t_1, _ = timed(lambda: fn(1))
                results[b][name].append(b * (new_tokens - 1) / max(t_n - t_1, 1e-9))
    return results


def continuous_batching(engine, concurrencies=(1, 4, 16), requests_per_client: int = 2, n: int = 32):
    engine.warmup()                        # compile every step shape before timing
    engine.start()
    rng = np.random.default_rng(1)
    out = {}
    try:
        for c in concurrencies:
            done = []

            def client():
                for _ in range(requests_per_client):
                    prompt = list(map(int, rng.integers(0, 32000, size=PROMPT_LEN)))
                    done.append(len(engine.generate([prompt], max_new_tokens=n)[0].tokens))
            threads = [threading.Thread(target=client) for _ in range(c)]
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            out[c] = sum(done) / (time.perf_counter() - start)
    finally:
        engine.stop()
    return out


def weight_bytes_per_token(engine) -> int:
    """Bytes of weights one batch-1 decode step reads: all but the routed experts, plus
    top_k / num_experts of each MoE layer's experts (the embedding: one row)."""
    from flax import nnx
    cfg, total = engine.cfg, 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(engine.model)))[0]:
        key = ".".join(str(getattr(k, "key", k)) for k in path)
        nbytes = leaf.size * leaf.dtype.itemsize
        if ".experts." in key:
            nbytes = nbytes * cfg.moe.top_k // cfg.moe.num_experts
        elif key == "embed" and not cfg.tie_embeddings:
            nbytes = nbytes // cfg.vocab_size
        total += nbytes
    return total


def memory_bandwidth_gbs(mb: int = 512, repeats: int = 5) -> float:
    """Read bandwidth: best of a jitted sum over a ``mb`` MB float32 array."""
    x = jnp.ones((mb * 1024 * 1024 // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    best = min(timed(lambda: total(x).block_until_ready())[0] for _ in range(repeats))
    return x.nbytes / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--parts", default="decode,batching",
                        help=f"which parts to run, comma-separated: {','.join(PARTS)}")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if not parts <= set(PARTS):
        parser.error(f"--parts: {args.parts!r}; allowed: a comma-separated subset of {','.join(PARTS)}")
    if not 2 <= args.new_tokens <= MAX_NEW_TOKENS or args.rounds < 1:
        # decode tokens/s is (N - 1) tokens over the time a run of N takes beyond a run of 1
        parser.error(f"need 2 <= --new-tokens <= {MAX_NEW_TOKENS} and --rounds >= 1, "
                     f"got {args.new_tokens} and {args.rounds}")
    import torch
    threads = len(os.sched_getaffinity(0))   # XLA:CPU runs one intra-op thread per usable core
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        hf_model = build_hf(work)
        n_params = sum(p.numel() for p in hf_model.parameters())
        print(f"Mixtral, {n_params / 1e6:.0f}M parameters (8 experts, top-2), float32, prompt {PROMPT_LEN} "
              f"tokens, {args.new_tokens} new, {threads} CPU threads (torch {torch.get_num_threads()}), "
              f"jax {jax.__version__}, {args.rounds} interleaved rounds")
        if "decode" in parts:
            decode_part(hf_model, work, args)
        if "rows" in parts:
            lone_request_part(work, args)
        if "batching" in parts:
            cb = continuous_batching(to_engine(work / "hf", work, 16), n=args.new_tokens)
            print(f"continuous batching, 16 slots, {args.new_tokens} new tokens per request: "
                  + ", ".join(f"concurrency {c}: {v:.1f} tok/s" for c, v in cb.items()))


def lone_request_part(work: Path, args) -> None:
    """One request at a time: 16 slots with and without row buckets vs 1 slot."""
    engines = {"1 slot": to_engine(work / "hf", work, 1),
               "16 slots, row buckets": to_engine(work / "hf", work, 16),
               "16 slots, all rows": to_engine(work / "hf", work, 16, row_buckets=False)}
    prompt = np.random.default_rng(1).integers(0, 1000, PROMPT_LEN).tolist()
    rates = {name: [] for name in engines}
    tokens = {}
    for _ in range(args.rounds + 1):             # the first round compiles
        for name, engine in engines.items():
            start = time.perf_counter()
            tokens[name] = engine.generate([prompt], max_new_tokens=args.new_tokens)[0].tokens
            rates[name].append(args.new_tokens / (time.perf_counter() - start))
    base = statistics.median(rates["1 slot"][1:])
    for name, r in rates.items():
        rate = statistics.median(r[1:])
        print(f"lone request, {name:>22}: {rate:6.1f} tok/s  ({rate / base:.2f}x the 1-slot engine; "
              f"same tokens: {tokens[name] == tokens['1 slot']})")


def decode_part(hf_model, work: Path, args) -> None:
    engines = {b: to_engine(work / "hf", work, b) for b in (1, 8)}
    table = decode_table(hf_model, engines, args.new_tokens, args.rounds)
    print(f"{'batch':>5}  {'transformers tok/s':>18}  {'serve.Engine tok/s':>18}  {'ratio':>6}  same tokens")
    for b, r in table.items():
        hf, ours = statistics.median(r["hf"]), statistics.median(r["engine"])
        print(f"{b:>5}  {hf:>18.1f}  {ours:>18.1f}  {ours / hf:>5.2f}x  {r['same_tokens']} "
              f"({r['agree']:.0%} of tokens agree)")
    per_token = weight_bytes_per_token(engines[1])
    rate = statistics.median(table[1]["engine"])
    bandwidth = memory_bandwidth_gbs()
    print(f"batch-1 decode reads {per_token / 1e6:.1f} MB of weights per token: {per_token * rate / 1e9:.2f} GB/s "
          f"achieved vs {bandwidth:.1f} GB/s measured read bandwidth ({per_token * rate / 1e9 / bandwidth:.0%})")


if __name__ == "__main__":
    main()
