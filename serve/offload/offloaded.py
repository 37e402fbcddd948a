"""A Transformer whose routed experts live in an ExpertStore, run layer by layer from Python.

Routing is data-dependent and the slot table is host state, so this path
cannot be one jitted function: per step it runs jitted per-layer pieces
(:mod:`serve.offload.pieces`, fixed shapes) and decides copies in between.
Per MoE layer l and step:
1. prefetch (``prefetch=True``): layer l's ffn_norm + router applied to the
   hidden state entering its block, plus the block's attention output at
   the row's previous position, predicts its experts before attention runs
   (``pieces.predict``); their copies start now (``jax.device_put`` is
   asynchronous) and overlap the attention. (Predicting from the previous
   block's post-attention state would overlap more work but guessed worse on
   the trained tiny model: 57-74% of each token's top-k against 67-78%.)
2. attention (jitted) -> x_mid, h = ffn_norm(x_mid); the router on h.
3. the slot table turns the needed experts (of valid tokens) into waves:
   copies of the misses, then the slot-indexed grouped matmul of the wave.
4. combine with the gates, shared experts, residual (jitted).
Results equal the all-resident forward: every (token, k) pair is computed
once, from the same weights, by the same grouped-matmul math.
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
from flax import nnx

from moejax import dispatch as dispatch_lib
from moejax.memory.kinds import MemoryBeside
from moejax.moe import MoE
from serve.offload import pieces
from serve.offload.policies import make_policy
from serve.offload.pool import SlotPool, wave_compute
from serve.offload.slots import LayerStats, SlotTable
from serve.offload.store import ExpertStore
from serve.offload.trace import RoutingTrace


def counts_E(experts_TK: np.ndarray, valid: np.ndarray, num_experts: int) -> np.ndarray:
    """Pairs per expert; ``valid``: [T] (tokens) or [T, K] (pairs) mask."""
    return np.bincount(experts_TK[valid].reshape(-1), minlength=num_experts)


def moe_of(ffn) -> tuple[MoE, object] | None:
    """(the MoE block, the memory beside it or None) of a layer's FFN; None for a layer
    without routed experts. 'moe' is the block itself; 'engram+moe' / 'pkm+moe'
    (``MemoryBeside``) hold it beside a memory, whose output is added to the MoE's."""
    if isinstance(ffn, MoE):
        return ffn, None
    if isinstance(ffn, MemoryBeside) and isinstance(ffn.ffn, MoE):
        return ffn.ffn, ffn.memory
    if any(isinstance(m, MoE) for _, m in nnx.iter_graph(ffn)):
        raise ValueError(f"offload: FFN kind {type(ffn).__name__} holds an MoE block the expert "
                         "store cannot drive (supported: 'moe', and a memory beside an MoE)")
    return None


class OffloadedModel:
    """Layer-by-layer forward with per-layer slot pools over ``store``.

    ``slots_L``: slots of each MoE layer; ``policy``: a name of
    ``serve.offload.policies.POLICIES``; ``frequency_LE``: expert
    frequencies of a recorded trace (policy 'static'); ``record``: keep the
    routing of every step (``trace()``).
    """

    def __init__(self, model, store: ExpertStore, slots_L: list[int], *, policy: str = "lfru",
                 prefetch: bool = True, frequency_LE=None, lfru_decay: float = 0.75,
                 record: bool = False):
        self.cfg, self.store, self.prefetch = model.cfg, store, prefetch
        blocks = self._blocks = list(model.layers)
        moes = [moe_of(b.ffn) for b in blocks]
        self.moe_index = [i for i, m in enumerate(moes) if m is not None]
        if len(slots_L) != len(self.moe_index):
            raise ValueError(f"slots: {len(slots_L)} budgets for {len(self.moe_index)} MoE layers")
        if store.num_layers != len(self.moe_index):
            raise ValueError(f"store holds {store.num_layers} MoE layers, the model has "
                             f"{len(self.moe_index)}")
        moe0 = moes[self.moe_index[0]][0]
        self.num_experts, self.top_k = moe0.cfg.num_experts, moe0.cfg.top_k
        self.dtype = moe0.dtype
        backend = moe0.backend
        # 'capacity' dispatch drops the pairs past each expert's capacity: so must we
        self.capacity_factor = moe0.cfg.capacity_factor if backend == "capacity" else None
        self.gmm_backend = dispatch_lib.GMM_BACKENDS.get(backend, "xla")
        self.embed_VD = pieces.on_device(model.embed[...])
        self.head_parts = pieces.split(model.final_norm, getattr(model, "lm_head", None), model.embed)
        self.attn_parts = [pieces.split(b.attn_norm, b.attn, b.ffn_norm) for b in blocks]
        self.ffn_parts = []
        for b, parts in zip(blocks, moes):
            if parts is not None:
                moe, side = parts
                self.ffn_parts.append((pieces.split(moe.router), pieces.split(moe.shared, moe.shared_gate),
                                       pieces.split(b.ffn_norm, moe.router),
                                       None if side is None else pieces.split(side)))
            else:
                self.ffn_parts.append(pieces.split(b.ffn))
        # decode state of the FFN kinds (memory layers): previous ids, per-layer state
        self.token_lookback = max((getattr(b.ffn, "token_lookback", 0) for b in blocks), default=0)
        shapes = store.shapes()
        self.pools = [SlotPool(shapes, slots) for slots in slots_L]
        self._policy = (policy, slots_L, frequency_LE, lfru_decay)
        self.reuse = True       # False: forget the slots every step (the fetch-every-time baseline)
        self.record = record
        self.reset()

    def reset(self) -> None:
        """Forget the resident experts, the policies' history, the recorded routing and the
        figures: as freshly built (the slot pools' stale contents are never read)."""
        policy, slots_L, frequency_LE, lfru_decay = self._policy
        self.tables = []
        for layer, slots in enumerate(slots_L):
            freq = None if frequency_LE is None else frequency_LE[layer]
            pol = make_policy(policy, self.num_experts, slots, frequency_E=freq, lfru_decay=lfru_decay)
            self.tables.append(SlotTable(self.num_experts, slots, pol))
        self.store.bytes_to_device = self.store.bytes_from_disk = 0
        self.step = 0
        self._need, self._pred, self._tokens = [], [], []
        self._carry = [None] * len(self.moe_index)   # per MoE block: attention output [B, D]

    # ------------------------------------------------------------------ copies
    def _copy(self, layer: int, loads) -> None:
        for expert, slot in loads:
            self.pools[layer].load(slot, self.store.fetch(layer, expert))

    @property
    def predicting(self) -> bool:
        return self.prefetch or self.record

    def _carry_of(self, layer: int, x_BSD):
        carry = self._carry[layer]
        if carry is None or carry.shape != (x_BSD.shape[0], x_BSD.shape[2]):
            carry = self._carry[layer] = pieces.on_device(
                jnp.zeros((x_BSD.shape[0], x_BSD.shape[2]), x_BSD.dtype))
        return carry

    def _prefetch(self, layer: int, x_BSD, positions_BS, valid_BS) -> np.ndarray:
        """Predicted chance per expert (x1000, int) for the trace; start the copies if asked."""
        if not self.predicting:
            return np.zeros(self.num_experts, np.int32)
        (gdef, state) = self.ffn_parts[self.moe_index[layer]][2]
        chance_E = pieces.predict(gdef, state, x_BSD, self._carry_of(layer, x_BSD), positions_BS,
                                  valid_BS)
        pred_E = np.round(np.asarray(chance_E) * 1000).astype(np.int32)
        if self.prefetch:
            self._copy(layer, self.tables[layer].prefetch(pred_E, self.step))
        return pred_E

    # ------------------------------------------------------------------ forward
    def init_caches(self, batch_size: int, max_len: int) -> dict:
        """Per-layer decode caches (the layers' own): attention caches, the FFN kinds'
        decode states (None for stateless kinds) and the token history (when a kind
        looks back at previous ids), as ``Transformer.init_cache`` keeps them."""
        layers = [b.init_cache(batch_size, max_len) for b in self._blocks]
        return pieces.on_device({
            "attn": [c["attn"] for c in layers], "ffn": [c["ffn"] for c in layers],
            "tokens_BT": (jnp.full((batch_size, max_len), -1, jnp.int32) if self.token_lookback
                          else None)})

    def forward(self, tokens_BS, positions_BS=None, valid_BS=None, caches=None):
        """(logits [B, S, V], caches) of one step: a full forward when ``caches`` is None,
        else the S new tokens of each row appended to the per-layer caches of
        :meth:`init_caches` (``valid_BS`` False on padding, which is neither cached nor
        fetched for; a row whose first position is 0 starts afresh)."""
        try:
            return self._forward(tokens_BS, positions_BS, valid_BS, caches)
        except BaseException:
            # a slot table records a step's loads before the copies are made: a step that
            # fails part-way (a store read error, Ctrl-C) leaves it naming experts their
            # slots never received, which later steps would compute with
            for table in self.tables:
                table.clear()
            raise

    def _forward(self, tokens_BS, positions_BS, valid_BS, caches):
        tokens_BS = jnp.asarray(tokens_BS, jnp.int32)
        batch, seq = tokens_BS.shape
        if positions_BS is None:
            positions_BS = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
        positions_BS = jnp.asarray(positions_BS, jnp.int32)
        valid_T = (np.ones(batch * seq, bool) if valid_BS is None
                   else np.asarray(valid_BS, bool).reshape(-1))
        valid_BS = None if valid_BS is None else jnp.asarray(valid_BS)
        valid_mask_BS = jnp.asarray(valid_T.reshape(batch, seq))
        decoding = caches is not None
        if decoding:
            caches = {**caches, "attn": list(caches["attn"]), "ffn": list(caches["ffn"])}
            attn_caches, ffn_states = caches["attn"], caches["ffn"]
        else:
            attn_caches = ffn_states = [None] * len(self.attn_parts)
        prev_BN = None
        if decoding and self.token_lookback:
            prev_BN = pieces.previous_tokens(caches["tokens_BT"], positions_BS, self.token_lookback)
        num_layers = len(self.tables)
        need_LE = np.zeros((num_layers, self.num_experts), np.int32)
        pred_LE = np.zeros_like(need_LE)
        x_BSD = pieces.embed(self.embed_VD, tokens_BS)
        layer = 0
        for i, (gdef, state) in enumerate(self.attn_parts):
            is_moe = i in self.moe_index
            if is_moe:      # copies start now and overlap this block's attention
                pred_LE[layer] = self._prefetch(layer, x_BSD, positions_BS, valid_mask_BS)
            x_in_BSD = x_BSD
            x_BSD, h_BSD, attn_caches[i] = pieces.attention(gdef, state, x_BSD, positions_BS,
                                                            cache=attn_caches[i], valid_BS=valid_BS)
            if is_moe and self.predicting:
                self._carry[layer] = pieces.next_carry(self._carry[layer], x_in_BSD, x_BSD,
                                                       valid_mask_BS)
            # a kind ignores the state of a row starting at position 0 (moejax.layers)
            ffn_inputs = (tokens_BS, positions_BS, valid_BS, prev_BN, ffn_states[i])
            if not is_moe:
                x_BSD, ffn_states[i] = pieces.dense_ffn(*self.ffn_parts[i], x_BSD, h_BSD, *ffn_inputs)
                continue
            (router, shared, _, side) = self.ffn_parts[i]
            side_BSD = None
            if side is not None:          # the memory beside the MoE
                side_BSD, ffn_states[i] = pieces.side_ffn(*side, h_BSD, *ffn_inputs)
            gates_TK, experts_TK = pieces.route(*router, h_BSD)
            pairs = valid_T
            if self.capacity_factor is not None:     # as moejax.dispatch.capacity_dispatch
                keep_TK = pieces.capacity_keep(experts_TK, self.num_experts, self.capacity_factor)
                gates_TK = jnp.where(keep_TK, gates_TK, 0.0)
                pairs = valid_T[:, None] & np.asarray(keep_TK)
            need_LE[layer] = counts_E(np.asarray(experts_TK), pairs, self.num_experts)
            y_TKD = self._experts(layer, h_BSD, experts_TK, valid_T, need_LE[layer])
            x_BSD = pieces.moe_output(*shared, x_BSD, h_BSD, y_TKD, gates_TK, side_BSD)
            layer += 1
        logits_BSV = pieces.head(*self.head_parts, x_BSD)
        if decoding and self.token_lookback:
            caches["tokens_BT"] = pieces.record_tokens(caches["tokens_BT"], tokens_BS, positions_BS,
                                                       valid_mask_BS)
        n_valid = int(valid_T.sum())
        for table in self.tables:
            table.stats.tokens += n_valid
        if self.record and n_valid:
            self._need.append(need_LE)
            self._pred.append(pred_LE)
            self._tokens.append(n_valid)
        self.step += 1
        return logits_BSV, caches

    def _experts(self, layer, h_BSD, experts_TK, valid_T, need_E):
        batch, seq, d_model = h_BSD.shape
        x_TD = h_BSD.reshape(batch * seq, d_model).astype(self.dtype)
        y_TKD = pieces.on_device(jnp.zeros((batch * seq, self.top_k, d_model), self.dtype))
        valid = jnp.asarray(valid_T)
        if not self.reuse:
            self.tables[layer].clear()
        for wave in self.tables[layer].access(need_E, self.step):
            self._copy(layer, wave.loads)
            y_TKD = wave_compute(self.pools[layer].arrays, x_TD, experts_TK, valid, y_TKD,
                                 jnp.asarray(wave.slot_map(self.num_experts)),
                                 gmm_backend=self.gmm_backend)
        return y_TKD

    # ------------------------------------------------------------------ figures
    def layer_stats(self) -> list[LayerStats]:
        return [t.stats for t in self.tables]

    def trace(self) -> RoutingTrace:
        if not self._need:
            raise ValueError("no steps recorded (record=True and run some steps)")
        return RoutingTrace(np.stack(self._need), np.array(self._tokens), self.top_k,
                            np.stack(self._pred))
