"""Memory layers: do they help, and what do they cost? Three parts, one process.

1. recall: a synthetic key -> value task (F random facts "a b -> v"; sequences
   are runs of triples a b v drawn from the facts). The same 2-layer model
   with a product-key memory as its second FFN and with a dense SwiGLU FFN of
   equal active FLOPs per token, trained for the same steps on the same
   batches, interleaved; loss and accuracy at the value positions.
2. corpus: presets tiny-mem and tiny-engram next to tiny on the built-in corpus
   (byte-level standard library), the train step of ``python -m train``, same
   steps and batches, interleaved: validation bits/byte and tokens/s.
3. speed: forward + backward per token of one memory layer next to a dense
   SwiGLU of the same active FLOPs, interleaved medians.

    PYTHONPATH=. python benchmarks/memory_recall.py [--parts recall,corpus,speed]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import moejax
from benchmarks.timing import format_table, interleaved_samples
from moejax.config import MemoryConfig
from moejax.memory import NGramMemory, ProductKeyMemory
from moejax.moe import SwiGLU
from train import data as data_lib
from train.config import TrainConfig
from train.optim import make_optimizer
from train.step import lm_loss, split_model, train_step_fn


def pkm_flops(mem: MemoryConfig, d_model: int) -> int:
    """Multiply-adds per token: query, sub-key scores, k x k sums, value bag, gate, output."""
    d_value = mem.d_value or d_model
    h, k = mem.num_heads, mem.top_k
    return (d_model * h * mem.d_key + h * mem.num_keys * mem.d_key + h * k * k
            + h * k * d_value + 2 * d_model * d_value)


def engram_flops(mem: MemoryConfig, d_model: int) -> int:
    """Multiply-adds per token: W_k, W_v, gate dot, the depthwise conv."""
    e = len(mem.ngram_orders) * mem.ngram_heads * mem.ngram_d_row
    return 2 * e * d_model + d_model + mem.ngram_conv_kernel * d_model


def equal_flops_d_ff(flops: int, d_model: int) -> int:
    return max(1, round(flops / (3 * d_model)))  # SwiGLU: gate, up, down


# ----------------------------------------------------------------------------- recall

def recall_facts(num_facts: int, key_vocab: int, vocab: int, seed: int):
    rng = np.random.default_rng(seed)
    pairs = rng.choice(key_vocab * key_vocab, size=num_facts, replace=False)
    values = rng.integers(key_vocab, vocab, size=num_facts)  # values never look like keys
    return np.stack([pairs // key_vocab, pairs % key_vocab, values], axis=1).astype(np.int32)


def recall_batch(facts, batch: int, triples: int, rng) -> np.ndarray:
    pick = rng.integers(0, len(facts), size=(batch, triples))
    return facts[pick].reshape(batch, triples * 3)


def recall_models(args):
    mem = MemoryConfig(num_slots=args.slots, top_k=args.top_k, num_heads=args.heads, d_key=args.d_key)
    d_ff = equal_flops_d_ff(pkm_flops(mem, args.d_model), args.d_model)
    base = dict(vocab_size=args.vocab, d_model=args.d_model, n_layers=2, n_heads=4, n_kv_heads=4,
                d_ff=d_ff, max_seq_len=args.triples * 3, memory=mem)
    return {"pkm": moejax.ModelConfig(name="recall-pkm", ffn_kinds=("dense", "pkm"), **base),
            "dense": moejax.ModelConfig(name="recall-dense", ffn_kinds=("dense", "dense"), **base)}, d_ff


def value_loss_fn(graphdef):
    def loss(params, nonparam, batch_BS):
        logits, _ = nnx.merge(graphdef, params, nonparam)(batch_BS[:, :-1])
        ce_BS = optax.softmax_cross_entropy_with_integer_labels(logits, batch_BS[:, 1:])
        is_value_S = (jnp.arange(1, batch_BS.shape[1]) % 3) == 2     # targets at positions 2, 5, ...
        mask_BS = jnp.broadcast_to(is_value_S[None, :], ce_BS.shape).astype(jnp.float32)
        correct = (jnp.argmax(logits, -1) == batch_BS[:, 1:]).astype(jnp.float32)
        return jnp.sum(ce_BS * mask_BS) / jnp.sum(mask_BS), jnp.sum(correct * mask_BS) / jnp.sum(mask_BS)
    return loss


def recall(args) -> None:
    cfgs, d_ff = recall_models(args)
    facts = recall_facts(args.facts, args.key_vocab, args.vocab, seed=0)
    train_cfg = TrainConfig(lr=args.lr, steps=args.steps, warmup_steps=20, weight_decay=0.0)
    entries = {}
    for name, cfg in cfgs.items():
        graphdef, params, nonparam = split_model(moejax.Transformer(cfg, rngs=nnx.Rngs(0)))
        tx = make_optimizer(train_cfg, params)
        loss = value_loss_fn(graphdef)

        def step(params, opt_state, nonparam, batch, tx=tx, loss=loss):
            (value, acc), grads = jax.value_and_grad(loss, has_aux=True)(params, nonparam, batch)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, value, acc
        n_params = sum(x.size for x in jax.tree.leaves(params))
        entries[name] = dict(step=jax.jit(step, donate_argnums=(0, 1)), state=[params, tx.init(params)],
                             nonparam=nonparam, eval=jax.jit(loss), params=n_params, seconds=0.0)
    rng = np.random.default_rng(1)
    print(f"recall: {args.facts} facts over {args.key_vocab}^2 keys, values in [{args.key_vocab}, "
          f"{args.vocab}); batch {args.batch} x {args.triples} triples; {args.steps} steps; "
          f"d_model {args.d_model}; dense d_ff {d_ff} (= PKM active FLOPs "
          f"{pkm_flops(cfgs['pkm'].memory, args.d_model):,} per token)")
    print(f"{'step':>6} " + " ".join(f"{n + ' loss':>11} {n + ' acc':>9}" for n in entries))
    for s in range(1, args.steps + 1):
        batch = jnp.asarray(recall_batch(facts, args.batch, args.triples, rng))
        for name in (entries if s % 2 else reversed(list(entries))):
            e = entries[name]
            start = time.perf_counter()
            e["state"][0], e["state"][1], loss, acc = e["step"](*e["state"], e["nonparam"], batch)
            e["last"] = (loss, acc)
            jax.block_until_ready(loss)
            e["seconds"] += time.perf_counter() - start
        if s % args.log_every == 0 or s == args.steps:
            print(f"{s:>6} " + " ".join(f"{float(e['last'][0]):>11.3f} {float(e['last'][1]):>9.3f}"
                                        for e in entries.values()), flush=True)
    eval_rng = np.random.default_rng(2)
    eval_batches = [jnp.asarray(recall_batch(facts, args.batch, args.triples, eval_rng)) for _ in range(8)]
    print(f"{'model':<8} {'params':>9} {'value loss':>11} {'value acc':>10} {'train s (incl. compile)':>24}")
    for name, e in entries.items():
        res = [e["eval"](e["state"][0], e["nonparam"], b) for b in eval_batches]
        print(f"{name:<8} {e['params'] / 1e6:>8.2f}M {np.mean([float(r[0]) for r in res]):>11.3f} "
              f"{np.mean([float(r[1]) for r in res]):>10.3f} {e['seconds']:>24.1f}")


# ----------------------------------------------------------------------------- corpus

CORPUS_CHUNK = 10   # steps per interleaved round


def corpus(args) -> None:
    train_cfg = TrainConfig(steps=args.corpus_steps, batch_size=16, seq_len=128)
    files = data_lib.stdlib_files()
    data = data_lib.load_text(files, data_lib._TextEncoder(None), "stdlib")
    sampler = data_lib.BatchSampler(data.train, train_cfg.batch_size, train_cfg.seq_len, seed=0)
    val = [jnp.asarray(b) for b in data_lib.eval_batches(data.val, 16, 128, 8)]
    entries = []
    for preset in args.presets.split(","):
        cfg = moejax.ModelConfig.preset(preset)
        graphdef, params, nonparam = split_model(moejax.Transformer(cfg, rngs=nnx.Rngs(0)))
        tx = make_optimizer(train_cfg, params)
        evaluate = jax.jit(lambda p, n, b, g=graphdef: lm_loss(nnx.merge(g, p, n)(b[:, :-1])[0], b[:, 1:]))
        entries.append(dict(name=preset, step=jax.jit(train_step_fn(graphdef, tx), donate_argnums=(0, 1, 2)),
                            state=[params, tx.init(params), nonparam], eval=evaluate, rates=[],
                            params=sum(x.size for x in jax.tree.leaves(params))))
    chunk = CORPUS_CHUNK
    tokens = chunk * train_cfg.tokens_per_step
    for r in range(math.ceil(args.corpus_steps / chunk)):
        batches = [jnp.asarray(sampler.batch(r * chunk + i)) for i in range(chunk)]
        for e in (entries if r % 2 == 0 else entries[::-1]):
            start = time.perf_counter()
            for batch in batches:
                *e["state"], metrics = e["step"](*e["state"], batch)
            jax.block_until_ready(metrics)
            if r > 0:   # round 0 holds the compilation
                e["rates"].append(tokens / (time.perf_counter() - start))
    steps = math.ceil(args.corpus_steps / chunk) * chunk
    print(f"corpus: {steps} steps of 16 x 128 bytes (python -m train's step and defaults), interleaved "
          f"rounds of {chunk} steps; tok/s: median over rounds after the first (it compiles)")
    print(f"{'preset':<12} {'params':>8} {'val bits/byte':>14} {'median tok/s':>13} {'vs ' + entries[0]['name']:>9}")
    base_rates = entries[0]["rates"]
    for e in entries:
        params, _, nonparam = e["state"]
        loss = np.mean([float(e["eval"](params, nonparam, b)) for b in val])
        bpb = loss / math.log(2) / data.bytes_per_token
        ratio = statistics.median([a / b for a, b in zip(e["rates"], base_rates)])
        print(f"{e['name']:<12} {e['params'] / 1e6:>7.2f}M {bpb:>14.3f} {statistics.median(e['rates']):>13,.0f} "
              f"{ratio:>8.2f}x")


# ----------------------------------------------------------------------------- speed

def speed(args) -> None:
    d_model, tokens = 256, 2048
    mem = MemoryConfig(num_slots=256 * 256, top_k=32, num_heads=4, d_key=128,
                       ngram_orders=(2, 3), ngram_heads=4, ngram_table_rows=2**18, ngram_d_row=32)
    ids = jax.random.randint(jax.random.key(0), (tokens // 256, 256), 0, 256)
    x = jax.random.normal(jax.random.key(1), (tokens // 256, 256, d_model))
    layers = {"pkm": (ProductKeyMemory(mem, d_model, rngs=nnx.Rngs(0)), pkm_flops(mem, d_model),
                      lambda m, x: m.read(x)),
              "engram": (NGramMemory(mem, d_model, rngs=nnx.Rngs(0), vocab_size=256),
                         engram_flops(mem, d_model), lambda m, x: m.apply(x, ids)[0])}
    candidates, lines = {}, []
    for name, (layer, flops, mem_call) in layers.items():
        d_ff = equal_flops_d_ff(flops, d_model)
        dense = SwiGLU(d_model, d_ff, rngs=nnx.Rngs(0))
        lines.append(f"  {name}: {flops:,} multiply-adds/token -> dense d_ff {d_ff}")
        for label, module, call in ((name, layer, mem_call),
                                    (f"dense~{name}", dense, lambda m, x: m(x))):
            grad = nnx.jit(nnx.grad(lambda m, x, call=call: jnp.sum(jnp.sin(call(m, x))), argnums=(0, 1)))
            candidates[label] = (lambda g=grad, m=module: g(m, x))
    samples = interleaved_samples(candidates, rounds=args.rounds)
    print(f"speed: forward + backward, {tokens} tokens, d_model {d_model}, {jax.default_backend()}")
    print("\n".join(lines))
    for name in layers:
        sub = {k: samples[k] for k in (f"dense~{name}", name)}
        print(format_table(sub, baseline=f"dense~{name}"))
        print(f"  {name}: {np.median(samples[name]) / tokens * 1e6:.2f} us/token, dense of equal FLOPs "
              f"{np.median(samples['dense~' + name]) / tokens * 1e6:.2f} us/token")


PARTS = {"recall": recall, "corpus": corpus, "speed": speed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="recall,corpus,speed")
    p.add_argument("--steps", type=int, default=800, help="recall: training steps")
    p.add_argument("--facts", type=int, default=8192)
    p.add_argument("--key-vocab", type=int, default=256)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--triples", type=int, default=16)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--slots", type=int, default=128 * 128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--d-key", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--corpus-steps", type=int, default=200)
    p.add_argument("--presets", default="tiny,tiny-mem,tiny-engram")
    p.add_argument("--rounds", type=int, default=7, help="speed: interleaved rounds")
    args = p.parse_args()
    parts = args.parts.split(",")
    if not set(parts) <= set(PARTS):
        p.error(f"--parts: {args.parts!r}; allowed: a comma-separated subset of {','.join(PARTS)}")
    if "corpus" in parts and args.corpus_steps <= CORPUS_CHUNK:
        # the first chunk of steps holds the compilation and is not timed
        p.error(f"--corpus-steps must be > {CORPUS_CHUNK} (steps run in timed chunks of "
                f"{CORPUS_CHUNK} after an untimed first one), got {args.corpus_steps}")
    for name, fn in PARTS.items():
        if name in parts:
            fn(args)
            print(flush=True)


if __name__ == "__main__":
    main()
