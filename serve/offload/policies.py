"""Replacement policies for one MoE layer's pool of device slots.

A policy only ranks experts: ``priority(experts, step)`` returns a keep-score
(higher = keep); :class:`serve.offload.slots.SlotTable` decides what to load
and where from that ranking, so every policy runs through the same slot
logic in the simulator and in the engine. Ties go to the lower expert id.

- ``lru``: last step the expert was needed.
- ``lfu``: number of steps it was needed (recency breaks ties).
- ``lfru``: frequency with recency decay: ``score = score * decay**dt + 1`` on
  each use, ranked by the score decayed to the current step.
- ``static``: the S-1 experts needed most often in a recorded trace stay
  pinned once loaded; the remaining slot(s) run LRU (one slot must stay free
  to stream the unpinned experts through).

Belady's clairvoyant bound is not a policy here (it needs the future): see
:func:`serve.offload.tracesim.belady`.
"""

from __future__ import annotations

import numpy as np

_BIG = 1e9  # one frequency unit outranks any recency (steps < 1e9)


class Policy:
    name = "base"

    def __init__(self, num_experts: int, num_slots: int):
        self.num_experts, self.num_slots = num_experts, num_slots
        self.last_E = np.full(num_experts, -1.0)

    def touch(self, experts: np.ndarray, step: int) -> None:
        """The experts needed by this step (called once per step, before any eviction)."""
        self.last_E[experts] = step

    def priority(self, experts: np.ndarray, step: int) -> np.ndarray:
        raise NotImplementedError


class LRU(Policy):
    name = "lru"

    def priority(self, experts, step):
        return self.last_E[experts]


class LFU(Policy):
    name = "lfu"

    def __init__(self, num_experts, num_slots):
        super().__init__(num_experts, num_slots)
        self.count_E = np.zeros(num_experts)

    def touch(self, experts, step):
        self.count_E[experts] += 1
        super().touch(experts, step)

    def priority(self, experts, step):
        return self.count_E[experts] * _BIG + self.last_E[experts]


class LFRU(Policy):
    name = "lfru"

    def __init__(self, num_experts, num_slots, decay: float = 0.75):
        super().__init__(num_experts, num_slots)
        if not 0.0 < decay < 1.0:
            raise ValueError(f"lfru decay must be in (0, 1), got {decay!r}")
        self.decay = decay
        self.score_E = np.zeros(num_experts)

    def _decayed(self, experts, step):
        age = np.maximum(step - self.last_E[experts], 0.0)
        return self.score_E[experts] * self.decay ** age

    def touch(self, experts, step):
        self.score_E[experts] = self._decayed(experts, step) + 1.0
        super().touch(experts, step)

    def priority(self, experts, step):
        return self._decayed(experts, step)


class Static(Policy):
    name = "static"

    def __init__(self, num_experts, num_slots, frequency_E: np.ndarray | None = None):
        super().__init__(num_experts, num_slots)
        if frequency_E is None:
            raise ValueError("policy 'static' needs a recorded trace (expert frequencies to pin)")
        frequency_E = np.asarray(frequency_E, np.float64)
        if frequency_E.shape != (num_experts,):
            raise ValueError(f"static: frequency_E must have shape ({num_experts},), "
                             f"got {frequency_E.shape}")
        order = np.lexsort((np.arange(num_experts), -frequency_E))
        self.pinned_E = np.zeros(num_experts, bool)
        self.pinned_E[order[:max(num_slots - 1, 0)]] = True

    def priority(self, experts, step):
        return self.pinned_E[experts] * _BIG + self.last_E[experts]


POLICIES = {"lru": LRU, "lfu": LFU, "lfru": LFRU, "static": Static}
ONLINE_POLICIES = tuple(POLICIES)


def make_policy(name: str, num_experts: int, num_slots: int, *, frequency_E=None,
                lfru_decay: float = 0.75) -> Policy:
    """Build a policy by name; 'static' takes the expert frequencies of a recorded trace."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; one of {tuple(POLICIES)}")
    if name == "static":
        return Static(num_experts, num_slots, frequency_E)
    if name == "lfru":
        return LFRU(num_experts, num_slots, lfru_decay)
    return POLICIES[name](num_experts, num_slots)
