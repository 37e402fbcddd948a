"""Per-request sampling: parameters, and one jittable sampler over a batch of rows.

Every row samples with its own temperature / top-k / top-p and its own key,
``fold_in(key(seed), token_index)``: the key depends only on the request's
seed and on how many tokens it has generated, never on its batch slot or on
the other requests, so a seeded request gives the same tokens in any batch.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int


class RequestError(ValueError):
    """A request's parameters or prompt are not acceptable (HTTP 400, CLI exit 2)."""


def checked_text(text: str, field: str) -> str:
    """``text``, refused when it holds a lone surrogate: JSON can write one ("\\ud800"), but
    it is no character, and no tokenizer can encode it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise RequestError(f"{field}: holds a lone surrogate {text[err.start]!r} at character {err.start} "
                           "(not valid Unicode)") from None
    return text


@dataclass(frozen=True)
class SamplingParams:
    """How one request generates. ``temperature=0`` is greedy (argmax).

    ``top_k=0`` and ``top_p=1`` switch those filters off; ``stop`` strings end
    generation (the text is cut before the stop string).
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        def need(ok, field, message):
            if not ok:
                raise RequestError(f"{field}: {message}")

        def is_int(v):   # Python or numpy integers, never bools
            return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))

        def is_num(v):
            return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))

        need(is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "max_new_tokens",
             f"must be an integer >= 1, got {self.max_new_tokens!r}")
        need(is_num(self.temperature) and 0.0 <= self.temperature <= 100.0, "temperature",
             f"must be a number in [0, 100], got {self.temperature!r}")
        need(is_num(self.top_p) and 0.0 < self.top_p <= 1.0, "top_p",
             f"must be a number in (0, 1], got {self.top_p!r}")
        # top_k travels as int32 (a k past the vocabulary keeps every token)
        need(is_int(self.top_k) and 0 <= self.top_k < 2 ** 31, "top_k",
             f"must be an integer in [0, 2**31), got {self.top_k!r}")
        need(is_int(self.seed) and 0 <= self.seed < 2 ** 63, "seed",
             f"must be an integer in [0, 2**63), got {self.seed!r}")
        for name, kind in (("max_new_tokens", int), ("temperature", float), ("top_p", float),
                           ("top_k", int), ("seed", int)):     # numpy scalars -> Python numbers
            object.__setattr__(self, name, kind(getattr(self, name)))
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        need(isinstance(stop, (tuple, list)) and all(isinstance(s, str) and s for s in stop)
             and len(stop) <= 8, "stop", "must be a non-empty string or a list of at most 8 of them")
        object.__setattr__(self, "stop", tuple(stop))

    def replace(self, **changes) -> "SamplingParams":
        return dataclasses.replace(self, **changes)


def row_key(seed: Int[Array, ""], index: Int[Array, ""]) -> Array:
    """The key of one sampled token: the request's seed folded with its token index."""
    # seeds up to 2**63 arrive as two uint32 halves (x64 is off)
    key = jax.random.key(seed[0])
    key = jax.random.fold_in(key, seed[1])
    return jax.random.fold_in(key, index)


def _sample_row(logits_V, temperature, top_p, top_k, seed_2, index):
    greedy = jnp.argmax(logits_V).astype(jnp.int32)
    scaled_V = logits_V / jnp.maximum(temperature, 1e-6)
    sorted_V = jnp.sort(scaled_V)[::-1]
    vocab = logits_V.shape[0]
    # top-k: keep logits >= the k-th largest (k = 0 keeps all)
    kth = sorted_V[jnp.clip(jnp.where(top_k > 0, top_k, vocab) - 1, 0, vocab - 1)]
    # top-p: the smallest prefix of the sorted distribution whose mass reaches top_p; never
    # empty (a top_p that is 0 in float32 keeps the top token), everything at top_p = 1.
    # The mass is that of the top-k survivors, renormalised (top-k first, then top-p, as
    # Hugging Face and vLLM filter): over the whole vocabulary it would keep more tokens
    probs_V = jax.nn.softmax(jnp.where(sorted_V >= kth, sorted_V, -jnp.inf))
    before_V = jnp.cumsum(probs_V) - probs_V          # mass strictly above each entry
    cutoff = jnp.min(jnp.where((before_V < top_p) | (top_p >= 1.0), sorted_V, sorted_V[0]))
    keep_V = (scaled_V >= kth) & (scaled_V >= cutoff)
    masked_V = jnp.where(keep_V, scaled_V, -jnp.inf)
    sampled = jax.random.categorical(row_key(seed_2, index), masked_V).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)


def sample(logits_BV: Float[Array, "B V"], temperature_B: Float[Array, "B"], top_p_B: Float[Array, "B"],
           top_k_B: Int[Array, "B"], seed_B2: Array, index_B: Int[Array, "B"]) -> Int[Array, "B"]:
    """One token per row: greedy where temperature is 0, else top-k/top-p filtered sampling."""
    return jax.vmap(_sample_row)(logits_BV.astype(jnp.float32), temperature_B, top_p_B, top_k_B,
                                 seed_B2, index_B)


def split_seed(seed: int) -> tuple[int, int]:
    """A 63-bit seed as two uint32 words (the layout ``row_key`` reads)."""
    return seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
