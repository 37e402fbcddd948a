"""Int8 routed experts (``moejax.quantize_experts``) against float on a trained model.

Loads a model directory written by ``python -m train`` and compares, on fixed
validation windows of the built-in corpus (teacher forcing):
  - max relative logit error: max |int8 - float| / max |float| over all logits,
    and the median over positions of the per-position ratio;
  - greedy-token agreement: how often argmax(int8) == argmax(float);
  - validation loss of both;
and greedy continuations of a few prompts (full forward per token, no cache):
how many of the generated tokens agree before the first divergence.

    PYTHONPATH=. python -m train --steps 300 --out /tmp/seams_tiny
    PYTHONPATH=. python benchmarks/int8_experts.py --model /tmp/seams_tiny
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import moejax
from moejax import checkpoint
from train import data as data_lib


def _forward():
    return nnx.jit(lambda m, t: m(t)[0])


def teacher_forced(model_f, model_q, batches) -> dict:
    forward = _forward()
    max_err = max_ref = 0.0
    per_position, agree, total, nll_f, nll_q = [], 0, 0, 0.0, 0.0
    for batch in batches:
        tokens, targets = jnp.asarray(batch[:, :-1]), np.asarray(batch[:, 1:])
        lf, lq = np.asarray(forward(model_f, tokens)), np.asarray(forward(model_q, tokens))
        err = np.abs(lq - lf)
        max_err, max_ref = max(max_err, err.max()), max(max_ref, np.abs(lf).max())
        per_position.append((err.max(-1) / np.abs(lf).max(-1)).ravel())
        agree += int((lf.argmax(-1) == lq.argmax(-1)).sum())
        total += lf.shape[0] * lf.shape[1]
        for logits, acc in ((lf, "f"), (lq, "q")):
            logp = logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
            nll = -np.take_along_axis(np.asarray(logp), targets[..., None], -1).mean()
            if acc == "f":
                nll_f += nll / len(batches)
            else:
                nll_q += nll / len(batches)
    per_position = np.concatenate(per_position)
    return {"max_rel_err": max_err / max_ref, "median_pos_rel_err": float(np.median(per_position)),
            "p99_pos_rel_err": float(np.quantile(per_position, 0.99)),
            "over_1pct": float(np.mean(per_position > 0.01)),
            "agreement": agree / total, "positions": total, "loss_float": nll_f, "loss_int8": nll_q}


def greedy(model, prompt_BS: np.ndarray, new_tokens: int) -> np.ndarray:
    """Greedy decoding with one compiled shape: the whole buffer is run every step
    (attention is causal, so the unfilled tail does not change earlier logits)."""
    forward = _forward()
    prompt_len = prompt_BS.shape[1]
    tokens = np.zeros((prompt_BS.shape[0], prompt_len + new_tokens), np.int32)
    tokens[:, :prompt_len] = prompt_BS
    for pos in range(prompt_len, prompt_len + new_tokens):
        logits = forward(model, jnp.asarray(tokens))
        tokens[:, pos] = np.asarray(jnp.argmax(logits[:, pos - 1], axis=-1))
    return tokens[:, prompt_len:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="/tmp/seams_tiny")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    args = p.parse_args()
    model_f, cfg = checkpoint.load_model(args.model)
    model_q, _ = checkpoint.load_model(args.model)
    moejax.quantize_experts(model_q)
    corpus = data_lib.load_corpus(None)
    batches = data_lib.eval_batches(corpus.val, args.batch_size, args.seq_len, args.batches)
    stats = teacher_forced(model_f, model_q, batches)
    print(f"model {args.model} ({cfg.name}, {cfg.num_moe_layers} MoE layers), "
          f"{stats['positions']} validation positions")
    print(f"max relative logit error   {stats['max_rel_err']:.4f}  (max |int8 - float| / max |float|)")
    print(f"per-position error         median {stats['median_pos_rel_err']:.4f}, p99 "
          f"{stats['p99_pos_rel_err']:.4f}, {stats['over_1pct']:.2%} of positions over 0.01 "
          "(max |int8 - float| / max |float| within a position)")
    print(f"greedy-token agreement     {stats['agreement']:.4f}")
    print(f"validation loss            float {stats['loss_float']:.4f}  int8 {stats['loss_int8']:.4f}")
    prompts = np.stack([b[0, :32] for b in batches])
    gf, gq = greedy(model_f, prompts, args.new_tokens), greedy(model_q, prompts, args.new_tokens)
    same = gf == gq
    prefix = [int(np.argmin(row)) if not row.all() else len(row) for row in same]
    print(f"greedy continuations ({len(prompts)} prompts x {args.new_tokens} tokens): "
          f"{same.mean():.4f} of tokens equal, identical prefix lengths {prefix}")


if __name__ == "__main__":
    main()
