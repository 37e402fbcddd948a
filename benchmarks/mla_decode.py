"""MLA decoding: absorbed (W_kb folded into the query) vs expanded (latent cache -> per-head K/V),
one decode step of one attention layer; and the cache bytes per token of MLA vs an expanded K/V cache.

    PYTHONPATH=. python benchmarks/mla_decode.py [--rounds 7] [--lengths 512,2048]

Both paths read the same cache (latent c [B, T, C] + rotated key [B, T, P]);
"expanded" multiplies the whole cache by W_kb / W_vb every step, "absorbed"
moves the query into latent space and attends to c itself (one shared key head).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.timing import format_table, interleaved_samples
from moejax import ModelConfig
from moejax.attention import MLAttention


def cache_bytes_per_token(cfg: ModelConfig) -> tuple[int, int]:
    """(MLA cache, expanded per-head K/V cache) bytes per token per layer in cfg.dtype."""
    mla, size = cfg.mla, jnp.dtype(cfg.dtype).itemsize
    latent = (mla.kv_lora_rank + mla.qk_rope_head_dim) * size
    expanded = cfg.n_heads * (mla.qk_head_dim + mla.v_head_dim) * size
    return latent, expanded


def decode_step(attn: MLAttention, absorbed: bool):
    graphdef, state = nnx.split(attn)

    @jax.jit
    def step(state, x_B1D, cache, positions_B1):
        model = nnx.merge(graphdef, state)
        model.decode_absorbed = absorbed
        return model(x_B1D, positions_B1, cache)[0]
    return lambda *args: step(state, *args)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--lengths", default="512,2048")
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args(argv)

    cfg = ModelConfig.preset("deepseek-mini")
    for name, c in [("deepseek-mini", cfg), ("DeepSeek-V3 dims (bf16)", _v3_dims())]:
        latent, expanded = cache_bytes_per_token(c)
        print(f"{name}: cache bytes/token/layer: MLA {latent} vs expanded K/V {expanded} "
              f"({expanded / latent:.1f}x)")
    attn = MLAttention(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    for t in (int(x) for x in args.lengths.split(",")):
        b = args.batch
        cache = {"c": jnp.asarray(rng.normal(size=(b, t, cfg.mla.kv_lora_rank)), jnp.float32),
                 "k_rope": jnp.asarray(rng.normal(size=(b, t, cfg.mla.qk_rope_head_dim)), jnp.float32)}
        x = jnp.asarray(rng.normal(size=(b, 1, cfg.d_model)), jnp.float32)
        pos = jnp.full((b, 1), t - 1, jnp.int32)   # the last slot: attends to the whole cache
        fns = {name: decode_step(attn, absorbed) for name, absorbed in
               (("expanded", False), ("absorbed", True))}
        outs = {name: fn(x, cache, pos) for name, fn in fns.items()}
        err = float(jnp.max(jnp.abs(outs["absorbed"] - outs["expanded"])) / jnp.max(jnp.abs(outs["expanded"])))
        samples = interleaved_samples({n: (lambda f=f: f(x, cache, pos)) for n, f in fns.items()},
                                      rounds=args.rounds)
        print(f"\ndecode step, one MLA layer, B={b}, cache length T={t} "
              f"(float32, {jax.default_backend()}); "
              f"max rel diff {err:.1e}")
        print(format_table(samples, baseline="expanded"))


def _v3_dims() -> ModelConfig:
    from moejax.config import MLAConfig
    mla = MLAConfig(kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                    q_lora_rank=1536)
    return ModelConfig(vocab_size=8, d_model=64, n_layers=1, n_heads=128, n_kv_heads=128, d_ff=8,
                       mla=mla, dtype="bfloat16")


if __name__ == "__main__":
    main()
