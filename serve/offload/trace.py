"""Routing traces: what each MoE layer needed at each step, and what was predicted.

A trace is the input of the trace simulator and of the trace-driven choices of
the expert store (static pinning, slot budgets per layer). Shapes: N steps
(one engine forward each: a prefill chunk or a decode step of the batch),
L MoE layers, E experts.

- ``need_NLE``: int32, how many (token, k) pairs of step n routed to expert e
  in MoE layer l (0 = not needed). The store must have every needed expert on
  the device at some point while layer l of step n runs.
- ``pred_NLE``: int32 or None, the prefetch prediction for layer l at step n,
  made before the layer runs: the chance x 1000 that some token of the step
  picks each expert (``serve.offload.pieces.predict``); prefetch ranks by it
  plus recent use (``SlotTable.prefetch``).
- ``tokens_N``: tokens processed by step n (for bytes per token).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class RoutingTrace:
    need_NLE: np.ndarray
    tokens_N: np.ndarray
    top_k: int
    pred_NLE: np.ndarray | None = None

    def __post_init__(self):
        need = np.asarray(self.need_NLE)
        if need.ndim != 3:
            raise ValueError(f"RoutingTrace.need_NLE: must be [steps, layers, experts], got {need.shape}")
        if np.any(need < 0):
            raise ValueError("RoutingTrace.need_NLE: counts must be >= 0")
        object.__setattr__(self, "need_NLE", need.astype(np.int32))
        tokens = np.asarray(self.tokens_N, np.int64)
        if tokens.shape != need.shape[:1] or np.any(tokens < 1):
            raise ValueError(f"RoutingTrace.tokens_N: must be [{need.shape[0]}] positive counts, "
                             f"got shape {tokens.shape}")
        object.__setattr__(self, "tokens_N", tokens)
        if self.pred_NLE is not None:
            pred = np.asarray(self.pred_NLE).astype(np.int32)
            if pred.shape != need.shape:
                raise ValueError(f"RoutingTrace.pred_NLE: shape {pred.shape} differs from need_NLE "
                                 f"{need.shape}")
            object.__setattr__(self, "pred_NLE", pred)
        if not (isinstance(self.top_k, int) and 1 <= self.top_k <= need.shape[2]):
            raise ValueError(f"RoutingTrace.top_k: must be in [1, {need.shape[2]}], got {self.top_k!r}")

    @property
    def num_steps(self) -> int:
        return self.need_NLE.shape[0]

    @property
    def num_layers(self) -> int:
        return self.need_NLE.shape[1]

    @property
    def num_experts(self) -> int:
        return self.need_NLE.shape[2]

    def layer(self, layer: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(need_NE, pred_NE or None) of one MoE layer."""
        pred = None if self.pred_NLE is None else self.pred_NLE[:, layer]
        return self.need_NLE[:, layer], pred

    def concat(self, other: "RoutingTrace") -> "RoutingTrace":
        preds = None if self.pred_NLE is None or other.pred_NLE is None else \
            np.concatenate([self.pred_NLE, other.pred_NLE])
        return dataclasses.replace(self, need_NLE=np.concatenate([self.need_NLE, other.need_NLE]),
                                   tokens_N=np.concatenate([self.tokens_N, other.tokens_N]),
                                   pred_NLE=preds)

    def save(self, path: str | Path) -> None:
        arrays = dict(need_NLE=self.need_NLE, tokens_N=self.tokens_N, top_k=np.int64(self.top_k))
        if self.pred_NLE is not None:
            arrays["pred_NLE"] = self.pred_NLE
        np.savez_compressed(path, **arrays)

    @staticmethod
    def load(path: str | Path) -> "RoutingTrace":
        with np.load(path) as z:
            pred = z["pred_NLE"] if "pred_NLE" in z.files else None
            return RoutingTrace(z["need_NLE"], z["tokens_N"], int(z["top_k"]), pred)


def expert_frequency_LE(trace: RoutingTrace) -> np.ndarray:
    """Steps in which each expert of each layer was needed, [L, E] (static pinning)."""
    return (trace.need_NLE > 0).sum(axis=0)


def reuse_LN(trace: RoutingTrace) -> np.ndarray:
    """Per layer and step: fraction of the step's experts that the previous step also needed."""
    need = trace.need_NLE > 0
    both = (need[1:] & need[:-1]).sum(-1)
    count = np.maximum(need[1:].sum(-1), 1)
    return (both / count).T


def budgets_from_trace(trace: RoutingTrace, total_slots: int, *, min_slots: int = 1) -> list[int]:
    """Split ``total_slots`` over the layers: layers whose routing repeats less get more.

    A layer's weight is its mean number of distinct experts per step times
    (1 - its step-to-step reuse): the experts it must bring in per step under
    a cache that only keeps the last step. Every layer gets at least
    ``min_slots`` and at most E; the rest goes by largest remainder.
    """
    n_layers, n_experts = trace.num_layers, trace.num_experts
    if total_slots < n_layers * min_slots or total_slots > n_layers * n_experts:
        raise ValueError(f"budgets: total_slots={total_slots} must be in "
                         f"[{n_layers * min_slots}, {n_layers * n_experts}] for {n_layers} layers")
    need = trace.need_NLE > 0
    distinct_L = need.sum(-1).mean(0)
    churn_L = 1.0 - (reuse_LN(trace).mean(1) if trace.num_steps > 1 else np.zeros(n_layers))
    weight_L = distinct_L * churn_L + 1e-9
    budget_L = np.full(n_layers, min_slots)
    for _ in range(total_slots - budget_L.sum()):   # greedy by largest unmet share
        share_L = weight_L / weight_L.sum() * total_slots - budget_L
        share_L[budget_L >= n_experts] = -np.inf
        budget_L[int(np.argmax(share_L))] += 1
    return [int(b) for b in budget_L]
