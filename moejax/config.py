"""Frozen, self-validating configs: MoEConfig, MemoryConfig, ModelConfig (presets: moejax.presets).

Every config checks itself in ``__post_init__`` and names the offending field
and what is allowed, so a bad config fails at construction, not deep inside a
jitted function.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROUTERS = ("softmax", "sigmoid")
DISPATCHES = ("auto", "dense", "capacity", "ragged", "gmm")
EP_EXCHANGES = ("auto", "all_to_all", "ragged")
AUX_LOSS_TYPES = ("batch", "sequence")
DTYPES = ("float32", "bfloat16", "float16")
QK_NORMS = ("none", "head", "proj")
REMATS = ("none", "full", "dots")


class ConfigError(ValueError):
    """A config field holds a value that is not allowed."""


def _require(ok: bool, cls: str, field_name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{cls}.{field_name}: {message}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_ints(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(_is_int(value) and value > 0,
                 type(obj).__name__, name, f"must be a positive int, got {value!r}")


def _bools(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(isinstance(value, bool), type(obj).__name__, name, f"must be a bool, got {value!r}")


def _number(obj, name: str, *, above: float | None = None, at_least: float | None = None,
            optional: bool = False) -> None:
    """A finite int or float (not a bool, not a string) that is > ``above`` / >= ``at_least``."""
    value = getattr(obj, name)
    if optional and value is None:
        return
    ok = (_is_int(value) or isinstance(value, float)) and math.isfinite(value)
    bound = ""
    if above is not None:
        ok, bound = ok and value > above, f" > {above}"
    if at_least is not None:
        ok, bound = ok and value >= at_least, f" >= {at_least}"
    _require(ok, type(obj).__name__, name,
             f"must be {'None or ' if optional else ''}a finite number{bound}, got {value!r}")


def _choice(obj, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    _require(value in allowed, type(obj).__name__, name,
             f"must be one of {allowed}, got {value!r}")


@dataclass(frozen=True)
class MoEConfig:
    """One MoE block: router, routed experts (SwiGLU), optional shared experts.

    Field names follow the Hugging Face configs where one exists.
    ``shared_d_ff`` is the hidden width of the shared-expert FFN as a whole
    (default ``num_shared_experts * d_ff``). ``capacity_factor=None`` means
    dropless; a factor (overflow dropped) goes with dispatch 'capacity' or
    'auto' (which then picks 'capacity'), on one device and expert-parallel
    alike. ``bias_update_rate`` > 0 turns on aux-loss-free balancing
    (DeepSeek-V3): a per-expert selection bias nudged after every step.
    """

    d_model: int
    d_ff: int
    num_experts: int
    top_k: int
    num_shared_experts: int = 0
    shared_d_ff: int | None = None
    shared_expert_gate: bool = False
    router: str = "softmax"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    capacity_factor: float | None = None
    dispatch: str = "auto"
    aux_loss_coef: float = 0.01
    aux_loss_type: str = "batch"
    z_loss_coef: float = 0.001
    bias_update_rate: float = 0.0
    dtype: str = "float32"
    # Token exchange when experts are spread over the mesh's `expert` axis:
    # 'all_to_all' (fixed buffers, every backend), 'ragged' (ragged_all_to_all,
    # no padding sent), 'auto' (ragged on TPU/GPU, else all_to_all).
    ep_exchange: str = "auto"

    def __post_init__(self):
        name = "MoEConfig"
        _positive_ints(self, "d_model", "d_ff", "num_experts", "top_k", "n_group", "topk_group")
        _bools(self, "shared_expert_gate", "norm_topk_prob")
        _choice(self, "router", ROUTERS)
        _choice(self, "dispatch", DISPATCHES)
        _choice(self, "ep_exchange", EP_EXCHANGES)
        _choice(self, "aux_loss_type", AUX_LOSS_TYPES)
        _choice(self, "dtype", DTYPES)
        _require(self.top_k <= self.num_experts, name, "top_k",
                 f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        _require(self.num_experts % self.n_group == 0, name, "n_group",
                 f"n_group={self.n_group} must divide num_experts={self.num_experts}")
        _require(self.topk_group <= self.n_group, name, "topk_group",
                 f"topk_group={self.topk_group} exceeds n_group={self.n_group}")
        per_group = self.num_experts // self.n_group
        _require(self.topk_group * per_group >= self.top_k, name, "topk_group",
                 f"topk_group={self.topk_group} groups of {per_group} experts hold fewer "
                 f"than top_k={self.top_k} experts")
        _require(_is_int(self.num_shared_experts) and self.num_shared_experts >= 0,
                 name, "num_shared_experts", f"must be an int >= 0, got {self.num_shared_experts!r}")
        _require(self.shared_d_ff is None or (_is_int(self.shared_d_ff) and self.shared_d_ff > 0),
                 name, "shared_d_ff", f"must be None or a positive int, got {self.shared_d_ff!r}")
        _require(not self.shared_expert_gate or self.num_shared_experts > 0, name,
                 "shared_expert_gate", "needs num_shared_experts > 0")
        _number(self, "capacity_factor", above=0, optional=True)   # None: dropless
        _require(self.dispatch != "capacity" or self.capacity_factor is not None, name,
                 "capacity_factor", "dispatch='capacity' needs a capacity_factor")
        # A factor with a dropless backend was ignored on one device but sized the
        # expert-parallel buffers (and dropped pairs) on a mesh: refuse the mix.
        _require(self.capacity_factor is None or self.dispatch in ("auto", "capacity"), name,
                 "capacity_factor", f"capacity_factor={self.capacity_factor!r} applies to "
                 f"dispatch 'capacity' or 'auto' only; dispatch={self.dispatch!r} is dropless "
                 "(set capacity_factor=None, or dispatch='capacity' to drop overflow)")
        _number(self, "routed_scaling_factor", above=0)
        for coef in ("aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            _number(self, coef, at_least=0)
        _require(self.bias_update_rate == 0 or self.uses_router_bias, name, "bias_update_rate",
                 f"balances through the selection bias of router='sigmoid' only (router="
                 f"{self.router!r} has none); set it to 0 or use the sigmoid router")

    @property
    def shared_hidden(self) -> int:
        """Hidden width of the shared-expert FFN (0 when there is none)."""
        if self.num_shared_experts == 0:
            return 0
        return self.shared_d_ff or self.num_shared_experts * self.d_ff

    @property
    def uses_router_bias(self) -> bool:
        """Sigmoid routing carries the selection-only correction bias (DeepSeek-V3)."""
        return self.router == "sigmoid"

    def replace(self, **changes: Any) -> "MoEConfig":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class MemoryConfig:
    """Memory layers: product-key memory (FFN kind 'pkm') and hashed n-gram memory ('engram').

    Product-key memory (Lample et al. 2019; "Memory Layers at Scale", Berges
    et al. 2024): ``num_slots`` = n * n value rows of width ``d_value``
    (default: d_model), addressed by ``num_heads`` heads that each score n
    sub-keys per half of a ``d_key``-wide query and read ``top_k`` rows.
    ``share_values``: every 'pkm' layer of a model reads one value table.

    Hashed n-gram memory (DeepSeek's Engram): for each order n in
    ``ngram_orders`` and each of ``ngram_heads`` hash heads, the suffix n-gram
    of token ids at a position picks one ``ngram_d_row``-wide row.
    ``ngram_table_rows`` is split evenly over the (order, head) pairs and each
    pair takes the largest distinct prime that fits its share (its own
    modulus), so the table holds the sum of those primes, a little fewer rows.
    ``ngram_conv_kernel`` is the width of the causal depthwise convolution
    (dilation: the largest order). ``ngram_id_map``
    canonicalises ids before hashing ('casefold_bytes': ASCII upper case ->
    lower case, for byte-level vocabularies). ``hash_seed`` is folded into each
    layer's rng key when it draws its odd hash multipliers (saved with the model).
    """

    num_slots: int = 4096
    top_k: int = 32
    num_heads: int = 4
    d_key: int = 64
    d_value: int | None = None
    share_values: bool = False
    ngram_orders: tuple[int, ...] = (2, 3)
    ngram_heads: int = 4
    ngram_table_rows: int = 32768
    ngram_d_row: int = 32
    ngram_conv_kernel: int = 4
    ngram_id_map: str = "none"
    hash_seed: int = 0

    def __post_init__(self):
        name = "MemoryConfig"
        if isinstance(self.ngram_orders, list):  # JSON stores tuples as lists
            object.__setattr__(self, "ngram_orders", tuple(self.ngram_orders))
        _positive_ints(self, "num_slots", "top_k", "num_heads", "d_key", "ngram_heads",
                       "ngram_table_rows", "ngram_d_row", "ngram_conv_kernel")
        # rows are addressed with int32 indices (JAX's default): a larger table would wrap
        # them negative and every lookup past 2**31 - 1 would silently read row 0
        for rows in ("num_slots", "ngram_table_rows"):
            _require(getattr(self, rows) <= MAX_TABLE_ROWS, name, rows,
                     f"must be <= 2**31 - 1 (int32 row indices), got {getattr(self, rows)}")
        n = math.isqrt(self.num_slots)
        _require(n * n == self.num_slots, name, "num_slots",
                 f"must be a perfect square (n * n slots from n sub-keys per half), got {self.num_slots}")
        _require(self.top_k <= n, name, "top_k",
                 f"top_k={self.top_k} exceeds the n={n} sub-keys per half (num_slots={self.num_slots})")
        _require(self.d_key % 2 == 0, name, "d_key",
                 f"must be even (two halves of the query), got {self.d_key}")
        _bools(self, "share_values")
        _require(self.d_value is None or (_is_int(self.d_value) and self.d_value > 0),
                 name, "d_value", f"must be None (d_model) or a positive int, got {self.d_value!r}")
        orders = self.ngram_orders
        _require(isinstance(orders, tuple) and len(orders) > 0
                 and all(_is_int(o) and o >= 1 for o in orders)
                 and list(orders) == sorted(set(orders)), name, "ngram_orders",
                 f"must be a non-empty sorted tuple of distinct ints >= 1, got {orders!r}")
        _choice(self, "ngram_id_map", NGRAM_ID_MAPS)
        _require(_is_int(self.hash_seed) and 0 <= self.hash_seed < 2**32, name, "hash_seed",
                 f"must be an int in [0, 2**32) (folded into the rng key), got {self.hash_seed!r}")
        heads = len(orders) * self.ngram_heads
        share = self.ngram_table_rows // heads
        need = _nth_prime(heads)  # the heads need `heads` distinct primes <= their share
        _require(share >= need, name, "ngram_table_rows",
                 f"{self.ngram_table_rows} rows give each of the {len(orders)} orders x "
                 f"{self.ngram_heads} hash heads {share} rows, smaller than a hash head needs "
                 f"(>= {need} rows for {heads} distinct prime table sizes)")

    @property
    def num_keys(self) -> int:
        """n: sub-keys per half (num_slots = n * n)."""
        return math.isqrt(self.num_slots)

    def ngram_table_sizes(self) -> tuple[tuple[int, ...], ...]:
        """Prime table size of every hash head, [order][head]: the largest distinct
        primes that fit each head's share of ``ngram_table_rows``."""
        heads = len(self.ngram_orders) * self.ngram_heads
        primes = _primes_below(self.ngram_table_rows // heads, heads)
        h = self.ngram_heads
        return tuple(tuple(primes[o * h:(o + 1) * h]) for o in range(len(self.ngram_orders)))

    def replace(self, **changes: Any) -> "MemoryConfig":
        return dataclasses.replace(self, **changes)


NGRAM_ID_MAPS = ("none", "casefold_bytes")
MAX_TABLE_ROWS = 2**31 - 1   # memory table rows are int32 indices


def _is_prime(x: int) -> bool:
    return x >= 2 and all(x % d for d in range(2, math.isqrt(x) + 1))


def _nth_prime(count: int) -> int:
    """The count-th prime (1 -> 2): the smallest share that holds `count` distinct primes."""
    x, found = 1, 0
    while found < count:
        x += 1
        found += _is_prime(x)
    return x


def _primes_below(limit: int, count: int) -> list[int]:
    """The `count` largest primes <= limit, largest first."""
    out, x = [], limit
    while len(out) < count:
        if _is_prime(x):
            out.append(x)
        x -= 1
    return out


@dataclass(frozen=True)
class YarnConfig:
    """YaRN RoPE context extension (the HF ``rope_type='yarn'`` parameters).

    Frequencies blend interpolated (``/factor``) and original ones by a linear
    ramp over the dims between the ``beta_fast`` / ``beta_slow`` correction
    bounds for ``original_max_position_embeddings``; cos/sin are multiplied
    by ``attention_factor``.
    """

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float = 1.0
    truncate: bool = True

    def __post_init__(self):
        _number(self, "factor", at_least=1)
        _positive_ints(self, "original_max_position_embeddings")
        _number(self, "beta_fast", above=0)   # rotations: the correction bounds take their log
        _number(self, "beta_slow", above=0)
        _number(self, "attention_factor", above=0)
        _bools(self, "truncate")


@dataclass(frozen=True)
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2/V3); field names follow the HF config.

    Queries go through a low-rank bottleneck of width ``q_lora_rank`` (None =
    a full projection); keys and values share one latent of width
    ``kv_lora_rank`` that is expanded per head. Each query/key head is
    ``qk_nope_head_dim`` plain dims followed by ``qk_rope_head_dim`` rotary dims
    (the rotary key is shared by all heads); value heads are ``v_head_dim``
    wide. ``latent_norm_eps`` is the epsilon of the two latent RMSNorms
    (DeepSeek uses 1e-6 there, independent of ``rms_norm_eps``).
    ``softmax_mscale`` multiplies the softmax scale 1/sqrt(N+P) (DeepSeek's
    YaRN ``mscale_all_dim`` correction; 1 without YaRN).
    """

    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None
    latent_norm_eps: float = 1e-6
    softmax_mscale: float = 1.0

    def __post_init__(self):
        _positive_ints(self, "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
        _require(self.q_lora_rank is None or (_is_int(self.q_lora_rank) and self.q_lora_rank > 0),
                 "MLAConfig", "q_lora_rank", f"must be None or a positive int, got {self.q_lora_rank!r}")
        _require(self.qk_rope_head_dim % 2 == 0, "MLAConfig", "qk_rope_head_dim",
                 f"must be even (RoPE), got {self.qk_rope_head_dim}")
        _number(self, "latent_norm_eps", above=0)
        _number(self, "softmax_mscale", above=0)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(frozen=True)
class ModelConfig:
    """Decoder-only Transformer: embeddings, GQA + RoPE attention, per-layer FFN kinds.

    ``ffn_kinds`` names each layer's FFN: 'dense' (SwiGLU of width ``d_ff``),
    'moe' (needs ``moe``) or a kind registered with
    ``moejax.layers.register_ffn_kind``. None (the default) means 'moe' in
    every layer when ``moe`` is set, else 'dense'; it is filled in at
    construction, so ``cfg.ffn_kinds`` is always a tuple of n_layers names
    (use :func:`ffn_kinds_from_rule` for DeepSeek-style "first k dense").
    ``mla`` switches attention to multi-head latent attention (DeepSeek);
    ``rope_yarn`` turns on YaRN-scaled RoPE.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    head_dim: int | None = None
    moe: MoEConfig | None = None
    ffn_kinds: tuple[str, ...] | None = None
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = False
    qk_norm: str = "none"
    attention_bias: bool = False
    dtype: str = "float32"
    name: str = "custom"
    mla: MLAConfig | None = None
    rope_yarn: YarnConfig | None = None
    # Consecutive layers of one FFN kind run under nnx.scan over stacked parameters
    # (compile time flat in depth); `python -m train` turns it on by default.
    scan_layers: bool = False
    # Recompute in the backward pass: 'none', 'full' (keep only block inputs), 'dots'
    # (keep matmul outputs, recompute the elementwise work).
    remat: str = "none"
    memory: MemoryConfig | None = None   # for the memory FFN kinds ('pkm', 'engram', ...)

    def __post_init__(self):
        name = "ModelConfig"
        _choice(self, "remat", REMATS)
        _bools(self, "scan_layers", "tie_embeddings", "attention_bias")
        _number(self, "rope_theta", above=0)
        _number(self, "rms_norm_eps", above=0)
        _positive_ints(self, "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads",
                       "d_ff", "max_seq_len")
        _choice(self, "dtype", DTYPES)
        _choice(self, "qk_norm", QK_NORMS)
        _require(self.n_heads % self.n_kv_heads == 0, name, "n_kv_heads",
                 f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        _require(self.mla is not None or self.head_dim is not None or self.d_model % self.n_heads == 0,
                 name, "head_dim",
                 f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; set head_dim")
        _require(self.head_dim is None or (_is_int(self.head_dim) and self.head_dim > 0
                                           and self.head_dim % 2 == 0),
                 name, "head_dim", f"must be a positive even int (RoPE), got {self.head_dim!r}")
        _require(self.mla is not None or self.resolved_head_dim % 2 == 0, name, "head_dim",
                 f"head_dim {self.resolved_head_dim} must be even for RoPE")
        if self.moe is not None:
            _require(isinstance(self.moe, MoEConfig), name, "moe", "must be a MoEConfig or None")
            _require(self.moe.d_model == self.d_model, name, "moe",
                     f"moe.d_model={self.moe.d_model} differs from d_model={self.d_model}")
        if self.ffn_kinds is None:  # the default placement, filled in so the field is explicit
            object.__setattr__(self, "ffn_kinds", ffn_kinds_from_rule(self.n_layers, self.moe))
        self._check_ffn_kinds()
        _require(self.rope_yarn is None or isinstance(self.rope_yarn, YarnConfig), name, "rope_yarn",
                 "must be a YarnConfig or None")
        _require(self.memory is None or isinstance(self.memory, MemoryConfig), name, "memory",
                 "must be a MemoryConfig or None")
        if self.mla is not None:
            _require(isinstance(self.mla, MLAConfig), name, "mla", "must be an MLAConfig or None")
            _require(self.n_kv_heads == self.n_heads, name, "n_kv_heads",
                     f"MLA expands its latent to every head: n_kv_heads={self.n_kv_heads} must equal "
                     f"n_heads={self.n_heads}")
            _require(self.qk_norm == "none" and not self.attention_bias, name, "mla",
                     "MLA takes neither qk_norm nor attention_bias")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    def _check_ffn_kinds(self) -> None:
        needs_of = _ffn_kind_needs()
        kinds = self.ffn_kinds
        _require(isinstance(kinds, tuple) and all(isinstance(k, str) for k in kinds),
                 "ModelConfig", "ffn_kinds", f"must be a tuple of kind names, got {kinds!r}")
        _require(len(kinds) == self.n_layers, "ModelConfig", "ffn_kinds",
                 f"has {len(kinds)} entries but n_layers={self.n_layers}; name one kind per layer")
        for layer, kind in enumerate(kinds):
            _require(kind in needs_of, "ModelConfig", "ffn_kinds",
                     f"layer {layer}: unknown kind {kind!r}; registered: {', '.join(sorted(needs_of))}")
            for need in needs_of[kind]:
                _require(getattr(self, need) is not None, "ModelConfig", "ffn_kinds",
                         f"layer {layer} is {kind!r}, which needs {need} (got {need}=None)")

    def is_moe_layer(self, layer: int) -> bool:
        return self.ffn_kinds[layer] == "moe"

    @property
    def num_moe_layers(self) -> int:
        """Layers holding an MoE block (the rows of aux['expert_load']): 'moe' and every kind
        that needs the MoE config (e.g. 'engram+moe')."""
        needs_of = _ffn_kind_needs()
        return sum(kind == "moe" or "moe" in needs_of[kind] for kind in self.ffn_kinds)

    def replace(self, **changes: Any) -> "ModelConfig":
        """dataclasses.replace; when n_layers or moe changes and ffn_kinds is not given,
        a placement that was the default is re-derived (any other must be given anew)."""
        if ("n_layers" in changes or "moe" in changes) and "ffn_kinds" not in changes \
                and self.ffn_kinds == ffn_kinds_from_rule(self.n_layers, self.moe):
            changes["ffn_kinds"] = None
        return dataclasses.replace(self, **changes)

    def with_compute_dtype(self, dtype: str) -> "ModelConfig":
        """This config computing in ``dtype`` in every block, the MoE layers' own config
        included (parameters are built float32 either way)."""
        return self.replace(dtype=dtype, moe=None if self.moe is None else self.moe.replace(dtype=dtype))

    @staticmethod
    def preset(name: str, **overrides: Any) -> "ModelConfig":
        """A named preset (:mod:`moejax.presets`); ``overrides`` replace top-level fields."""
        from moejax.presets import PRESETS   # the presets are built from this module's classes
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}")
        cfg = PRESETS[name]()
        return cfg.replace(**overrides) if overrides else cfg

    @staticmethod
    def preset_names() -> list[str]:
        from moejax.presets import PRESETS
        return sorted(PRESETS)


# The built-in FFN kinds and the config fields each needs. moejax.layers registers
# their builders (a test checks the two agree); knowing them here lets a config be
# validated without importing jax, so command lines check their flags first.
BUILTIN_FFN_KIND_NEEDS = {
    "dense": (), "moe": ("moe",),
    # memory layers (moejax.memory.kinds; moejax.model imports it, which registers them)
    "pkm": ("memory",), "engram": ("memory",), "pkm+dense": ("memory",), "engram+dense": ("memory",),
    "pkm+moe": ("memory", "moe"), "engram+moe": ("memory", "moe"),
}


def _ffn_kind_needs() -> dict[str, tuple[str, ...]]:
    """Kind name -> needed fields: the built-ins, plus what was registered through
    moejax.layers (registering imports it, so an unimported registry holds no more)."""
    layers = sys.modules.get("moejax.layers")
    registered = {} if layers is None else {k: v.needs for k, v in layers.FFN_KINDS.items()}
    return {**BUILTIN_FFN_KIND_NEEDS, **registered}


def ffn_kinds_from_rule(n_layers: int, moe: MoEConfig | None, *, first_k_dense: int = 0,
                        moe_every: int = 1, moe_layers=None) -> tuple[str, ...]:
    """Per-layer kinds from the older placement rule: with ``moe`` set, layer i is 'moe'
    when ``i >= first_k_dense`` and ``(i - first_k_dense) % moe_every == 0``, or when
    i is in ``moe_layers`` if that is given; every other layer is 'dense'."""
    _require(isinstance(first_k_dense, int) and 0 <= first_k_dense <= n_layers, "ModelConfig",
             "first_k_dense", f"must be in [0, n_layers={n_layers}], got {first_k_dense!r}")
    _require(isinstance(moe_every, int) and moe_every >= 1, "ModelConfig", "moe_every",
             f"must be a positive int, got {moe_every!r}")

    def is_moe(i: int) -> bool:
        if moe is None:
            return False
        if moe_layers is not None:
            return i in moe_layers
        return i >= first_k_dense and (i - first_k_dense) % moe_every == 0

    return tuple("moe" if is_moe(i) else "dense" for i in range(n_layers))


# Placement fields of config.json files written before ffn_kinds existed.
_LEGACY_PLACEMENT = ("first_k_dense", "moe_every", "moe_layers")


def config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
    """JSON-ready dict of a ModelConfig (nested MoEConfig included)."""
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """Inverse of :func:`config_to_dict`; unknown fields are an error, not ignored."""
    data = dict(data)
    moe = data.pop("moe", None)
    mla = data.pop("mla", None)
    legacy = {k: data.pop(k) for k in _LEGACY_PLACEMENT if k in data}
    if data.get("ffn_kinds") is not None:
        data["ffn_kinds"] = tuple(data["ffn_kinds"])  # JSON stores tuples as lists
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"ModelConfig: unknown fields {sorted(unknown)}")
    if moe is not None:
        moe_known = {f.name for f in dataclasses.fields(MoEConfig)}
        if set(moe) - moe_known:
            raise ConfigError(f"MoEConfig: unknown fields {sorted(set(moe) - moe_known)}")
        moe = MoEConfig(**moe)
    if legacy:
        if data.get("ffn_kinds") is not None:
            raise ConfigError(f"ModelConfig: ffn_kinds together with the older placement fields "
                              f"{sorted(legacy)}; give one")
        if legacy.get("moe_layers") is not None:
            legacy["moe_layers"] = tuple(legacy["moe_layers"])
        if "n_layers" not in data:
            raise ConfigError("ModelConfig.n_layers: missing")
        data["ffn_kinds"] = ffn_kinds_from_rule(data["n_layers"], moe, **legacy)
    mla = _nested(MLAConfig, mla)
    rope_yarn = _nested(YarnConfig, data.pop("rope_yarn", None))
    memory = _nested(MemoryConfig, data.pop("memory", None))
    return ModelConfig(moe=moe, mla=mla, rope_yarn=rope_yarn, memory=memory, **data)


def read_config_file(path: str | Path) -> ModelConfig:
    """A moejax ``config.json`` -> ModelConfig. FileNotFoundError when it is absent;
    ConfigError naming the file when it is not a moejax model config (garbage, another
    program's config.json, unknown or invalid fields); other OSErrors pass through."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {path.parent}")
    try:
        data = json.loads(path.read_bytes())
        if not isinstance(data, dict):
            raise TypeError(f"a JSON {type(data).__name__}, not an object")
        return config_from_dict(data)
    except (ValueError, TypeError) as err:  # JSON, UTF-8 and ConfigError are ValueErrors
        lines = str(err).strip().splitlines()
        raise ConfigError(f"{path} is not a moejax model config "
                          f"({lines[0][:200] if lines else type(err).__name__})") from None


def _nested(cls, data: dict[str, Any] | None):
    if data is None:
        return None
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
    return cls(**data)
