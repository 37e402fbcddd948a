"""Decoder-only Transformer assembled from attention and per-layer FFN kinds; decoding with a cache."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from moejax import sharding, validate
from moejax.attention import Attention, MLAttention, RMSNorm
from moejax.config import ModelConfig
from moejax.decode_cache import Cache, check_room, previous_tokens, record_tokens, valid_mask
from moejax.layers import LayerAux, LayerContext, build_ffn, model_build
from moejax.memory import kinds as _memory_kinds  # noqa: F401  (registers 'pkm', 'engram', ...)
from moejax.layer_stack import ScannedBlocks, layer_groups, unstack_tree
from moejax.moe import MoE


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x), ctx).

    The FFN is whatever kind ``cfg.ffn_kinds[layer]`` names (``moejax.layers``):
    every kind is called the same way and returns ``(y, LayerAux)``. With a
    layer cache (decoding) attention reads and extends it, and an FFN kind
    that keeps decode state finds it in ``ctx.state`` and leaves the update in
    ``ctx.new_state``.
    """

    def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.attn = MLAttention(cfg, rngs=rngs) if cfg.mla is not None else Attention(cfg, rngs=rngs)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.ffn = build_ffn(cfg, layer, rngs=rngs)

    def init_cache(self, batch_size: int, max_len: int) -> dict:
        init_state = getattr(self.ffn, "init_state", None)
        return {"attn": self.attn.init_cache(batch_size, max_len),
                "ffn": None if init_state is None else init_state(batch_size, max_len)}

    def __call__(self, x_BSD, ctx: LayerContext, layer_cache: dict | None = None
                 ) -> tuple[Array, LayerAux, dict | None]:
        attn_cache = None if layer_cache is None else layer_cache["attn"]
        a_BSD, attn_cache = self.attn(self.attn_norm(x_BSD), ctx.positions_BS, attn_cache, ctx.valid_BS)
        x_BSD = sharding.constrain(x_BSD + a_BSD.astype(x_BSD.dtype), ("batch", "seq", "embed"))
        # a context of this layer's own: the FFN may set new_state on it
        state = None if layer_cache is None else layer_cache["ffn"]
        ctx = dataclasses.replace(ctx, state=state, new_state=None)
        y_BSD, aux = self.ffn(self.ffn_norm(x_BSD), ctx)
        x_BSD = sharding.constrain(x_BSD + y_BSD.astype(x_BSD.dtype), ("batch", "seq", "embed"))
        if layer_cache is not None:
            layer_cache = {"attn": attn_cache, "ffn": state if ctx.new_state is None else ctx.new_state}
        return x_BSD, aux, layer_cache


REMAT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.checkpoint_dots}


def call_block(block: Block, x_BSD, ctx: LayerContext, layer_cache, remat: str):
    """One block, rematerialised in the backward pass as ``remat`` says."""
    if remat == "none":
        return block(x_BSD, ctx, layer_cache)
    run = nnx.remat(lambda blk, x, c: blk(x, ctx, c), policy=REMAT_POLICIES[remat])
    return run(block, x_BSD, layer_cache)


class Transformer(nnx.Module):
    """Decoder-only language model.

    1. Embed tokens [B, S] -> [B, S, D] (float32 residual stream).
    2. n_layers pre-norm blocks (attention with RoPE; the FFN kind of each layer),
       unrolled (``self.layers``) or, with ``cfg.scan_layers``, as groups of
       consecutive same-kind layers run by ``nnx.scan`` over stacked
       parameters (``self.stacks``, see moejax.layer_stack).
    3. Final RMSNorm and the LM head (or the tied embedding) -> float32 logits.
    Tokens: integer ids [B, S] (float tokens are a TypeError). Outside ``jit``
    an id outside [0, vocab_size) is a ValueError naming it; under ``jit`` ids
    cannot be checked and follow ``jnp.take``: an id >= vocab_size embeds as
    NaN (NaN logits at its position and at later ones, which attend to it), a
    negative one counts from the end of the vocabulary.
    Returns (logits [B, S, V], aux) where aux is the layers' LayerAux reduced
    over layers (``LayerAux.reduce``): router losses summed, 'dropped_fraction'
    averaged over the MoE layers, 'expert_load' stacked as [num_moe_layers, E].

    Decoding: ``cache = model.init_cache(B, T)``, then
    ``logits_BSV, cache = model.extend(tokens_BS, cache, lengths_B)`` appends
    tokens at each row's length; see :meth:`extend`.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Param(nnx.initializers.normal(stddev=1.0)(
            rngs.params(), (cfg.vocab_size, cfg.d_model), jnp.float32), logical_axes=("vocab", "embed"))
        with model_build():   # what the layers share (shared_in_model) is this model's own
            if cfg.scan_layers:
                self.stacks = nnx.List([ScannedBlocks(Block, cfg, start, count, rngs=rngs)
                                        for start, count in layer_groups(cfg)])
            else:
                self.layers = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.n_layers)])
        self.final_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        if not cfg.tie_embeddings:
            self.lm_head = nnx.Param(nnx.initializers.normal(stddev=cfg.d_model ** -0.5)(
                rngs.params(), (cfg.d_model, cfg.vocab_size), jnp.float32),
                logical_axes=("embed", "vocab"))

    @property
    def _units(self):
        """What the layer loop runs: Blocks, or ScannedBlocks groups."""
        return self.stacks if self.cfg.scan_layers else self.layers

    @property
    def token_lookback(self) -> int:
        """How many previous token ids the FFN kinds need (max over layers)."""
        return max((getattr(ffn, "token_lookback", 0) for ffn, _ in self._ffns()), default=0)

    def _embed(self, tokens_BS):
        # gather rows from a table whole along embed (FSDP-gathered): a lookup
        # into an embed-split table cannot be re-split over batch efficiently
        embed_VD = sharding.constrain(self.embed[...], ("vocab", None))
        return sharding.constrain(jnp.take(embed_VD, tokens_BS, axis=0), ("batch", "seq", "embed"))

    def _head(self, x_BSD):
        x_BSD = self.final_norm(x_BSD)
        head_DV = self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]
        logits_BSV = jnp.einsum("bsd,dv->bsv", x_BSD.astype(jnp.float32), head_DV)
        return sharding.constrain(logits_BSV, ("batch", "seq", "vocab"))

    def _run_layers(self, x_BSD, ctx: LayerContext, caches: tuple | None):
        """Every layer in order -> (x, per-layer LayerAux list, new caches or None)."""
        remat = self.cfg.remat
        layer_aux, new_caches = [], []
        for i, unit in enumerate(self._units):
            cache = None if caches is None else caches[i]
            if self.cfg.scan_layers:
                x_BSD, aux_L, cache = unit(x_BSD, ctx, cache, remat=remat)
                layer_aux += unstack_tree(aux_L, unit.count)
            else:
                x_BSD, aux, cache = call_block(unit, x_BSD, ctx, cache, remat)
                layer_aux.append(aux)
            new_caches.append(cache)
        return x_BSD, layer_aux, None if caches is None else tuple(new_caches)

    def __call__(self, tokens_BS: Int[Array, "B S"], positions_BS: Int[Array, "B S"] | None = None
                 ) -> tuple[Float[Array, "B S V"], LayerAux]:
        """Full causal forward. ``positions_BS`` (default 0..S-1) must increase along each row."""
        validate.token_ids(tokens_BS, self.cfg.vocab_size)
        if positions_BS is None:
            positions_BS = jnp.broadcast_to(jnp.arange(tokens_BS.shape[1], dtype=jnp.int32),
                                            tokens_BS.shape)
        ctx = LayerContext(tokens_BS=tokens_BS, positions_BS=positions_BS)
        x_BSD, layer_aux, _ = self._run_layers(self._embed(tokens_BS), ctx, None)
        return self._head(x_BSD), LayerAux.reduce(layer_aux)

    def init_cache(self, batch_size: int, max_len: int) -> Cache:
        """An empty decode cache for ``batch_size`` rows of up to ``max_len`` tokens (ints, also
        numpy / JAX integer scalars; not bools)."""
        size, length = validate.as_int(batch_size), validate.as_int(max_len)
        if length is None or not 0 < length <= self.cfg.max_seq_len:
            raise ValueError(f"init_cache: max_len must be an int in [1, max_seq_len="
                             f"{self.cfg.max_seq_len}], got {max_len!r}")
        if size is None or size < 1:
            raise ValueError(f"init_cache: batch_size must be a positive int, got {batch_size!r}")
        batch_size, max_len = size, length
        layers = tuple(unit.init_cache(batch_size, max_len) for unit in self._units)
        return Cache(lengths_B=jnp.zeros((batch_size,), jnp.int32),
                     tokens_BT=jnp.full((batch_size, max_len), -1, jnp.int32), layers=layers)

    def extend(self, tokens_BS: Int[Array, "B S"], cache: Cache, lengths_B: Int[Array, "B"] | None = None
               ) -> tuple[Float[Array, "B S V"], Cache]:
        """Append S tokens to every row at its current length -> (logits [B, S, V], new cache).

        ``lengths_B[b]`` of the S tokens of row b are real (default: all); the
        rest is padding: it never enters the cache and its logits mean nothing.
        Shapes are fixed, so a jitted ``extend`` compiles once per S. Real ids are
        checked as in ``__call__`` (outside ``jit``: a ValueError naming a bad id).
        Tokens past the cache's ``max_len`` are a ValueError outside ``jit``; under
        ``jit`` they are not stored and their logits (and every later step's) are NaN.
        """
        if tokens_BS.ndim != 2:
            raise ValueError(f"extend: tokens_BS must be [batch, seq], got shape {tuple(tokens_BS.shape)}")
        b, s = tokens_BS.shape
        if b != cache.batch_size:
            raise ValueError(f"extend: tokens have batch {b}, the cache {cache.batch_size}")
        valid_BS, added_B = valid_mask(lengths_B, b, s)
        check_room(cache, added_B)
        positions_BS = cache.lengths_B[:, None] + jnp.arange(s, dtype=jnp.int32)[None, :]
        if valid_BS is not None:   # padding ids may be anything (-1, out of vocabulary)
            tokens_BS = jnp.where(valid_BS, tokens_BS, 0)
        validate.token_ids(tokens_BS, self.cfg.vocab_size)  # real ids only: padding is 0 now
        lookback = self.token_lookback
        prev_BN = previous_tokens(cache.tokens_BT, cache.lengths_B, lookback) if lookback else None
        ctx = LayerContext(tokens_BS=tokens_BS, positions_BS=positions_BS, valid_BS=valid_BS,
                           prev_tokens_BN=prev_BN)
        x_BSD, _, layers = self._run_layers(self._embed(tokens_BS), ctx, cache.layers)
        tokens_BT = record_tokens(cache.tokens_BT, tokens_BS, positions_BS, valid_BS)
        # past the cache's end (only possible under jit, where check_room cannot raise) a token
        # is dropped from the cache: NaN logits there and at every later step, not silent garbage
        over_BS = positions_BS >= cache.max_len
        if valid_BS is not None:   # padding logits mean nothing either way
            over_BS = over_BS & valid_BS
        logits_BSV = jnp.where(over_BS[:, :, None], jnp.nan, self._head(x_BSD))
        return logits_BSV, Cache(cache.lengths_B + added_B, tokens_BT, layers)

    def _ffns(self) -> list[tuple[nnx.Module, int]]:
        """(FFN module, how many layers it serves): 1 unrolled; a group's count when scanned,
        its variables then carrying a leading layer axis."""
        if self.cfg.scan_layers:
            return [(unit.block.ffn, unit.count) for unit in self.stacks]
        return [(block.ffn, 1) for block in self.layers]

    @property
    def moe_layers(self) -> list[MoE]:
        """The MoE blocks in layer order (the rows of aux['expert_load']), also those inside
        another FFN kind (a memory layer beside an MoE, 'engram+moe'); with scanned layers one
        module per group, its variables stacked over the group's layers."""
        return [moe for ffn, _ in self._ffns() for moe in _moes_in(ffn)]

    def update_router_biases(self, expert_load_LE: Float[Array, "L E"]) -> None:
        """Aux-loss-free balancing for every MoE layer, from aux['expert_load']."""
        row = 0
        for ffn, count in self._ffns():
            for moe in _moes_in(ffn):
                # scanned: biases [L, E] against loads [L, E], each row on its own
                moe.update_bias(expert_load_LE[row] if not self.cfg.scan_layers
                                else expert_load_LE[row:row + count])
                row += count


def _moes_in(ffn: nnx.Module) -> list[MoE]:
    """The MoE blocks of one FFN: itself, or ones nested in it (at most one per layer)."""
    return [m for _, m in nnx.iter_graph(ffn) if isinstance(m, MoE)]
