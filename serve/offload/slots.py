"""One MoE layer's pool of S device slots: the expert -> slot table and its step logic.

The same code drives the trace simulator (which only counts) and the engine
(which also copies weights and computes), so their figures agree by
construction.

Per step and layer, :meth:`SlotTable.access` with the set R of needed experts:
1. Hits are the needed experts already in a slot (loaded earlier, or by this
   step's prefetch). The policy is told R was used (``touch``).
2. Keep set F: the S highest-priority experts among residents and R. If some
   expert is missing and F holds S residents, its lowest member gives way to
   the best missing expert: one slot must stay free to stream misses through.
3. Slots holding residents in F are locked; the others stream. Misses load
   into streaming slots: empty ones first, then those holding experts R does
   not need (lowest priority first); slots of hits not in F only after the
   hits were computed. Misses outside F load first, so F's end up resident.
4. When there are more misses than streaming slots, the step runs in waves:
   wave 0 computes the hits and the misses that fit; every later wave reloads
   the streaming slots (least recently loaded first) and computes those. Each
   needed expert is computed in exactly one wave, so results stay exact.

:meth:`SlotTable.prefetch` makes the S experts most likely to be needed
resident before the layer runs: likelihood = the prediction (chance that
some token of the step picks the expert) + half its recent use (an
exponential average of "needed" over past steps). New ones load into empty
slots, then over the residents ranked lowest. On the trained 64-expert model
at 2 x top_k slots: prediction alone 0.91 of Belady's hit rate, with recent
use at weight 1 / 0.5 / 0.25: 0.906 / 0.931 / 0.940 at 11.0 / 11.5 / 12.3
copies per token (``benchmarks/RESULTS.md``, offloaded experts).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from serve.offload.policies import Policy


@dataclass
class Wave:
    """Copies to make (expert, slot), then the experts computed from which slot."""

    loads: list[tuple[int, int]] = field(default_factory=list)
    compute: dict[int, int] = field(default_factory=dict)

    def slot_map(self, num_experts: int) -> np.ndarray:
        """expert -> slot for the experts computed in this wave, -1 elsewhere ([E] int32)."""
        table_E = np.full(num_experts, -1, np.int32)
        for e, s in self.compute.items():
            table_E[e] = s
        return table_E


@dataclass
class LayerStats:
    """Counters of one layer (add them up for totals)."""

    steps: int = 0
    accesses: int = 0          # needed experts, summed over steps
    hits: int = 0              # needed and already in a slot when the layer ran
    demand_loads: int = 0      # misses: copies the layer waited for (stalls)
    prefetch_loads: int = 0    # copies started by prefetch
    prefetch_used: int = 0     # prefetched experts the step then needed
    prefetch_wasted: int = 0   # prefetched experts the step did not need
    extra_waves: int = 0       # waves beyond the first
    tokens: int = 0

    def __add__(self, other: "LayerStats") -> "LayerStats":
        return LayerStats(**{f.name: getattr(self, f.name) + getattr(other, f.name)
                             for f in dataclasses.fields(self)})

    @property
    def loads(self) -> int:
        return self.demand_loads + self.prefetch_loads

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0

    @property
    def prefetch_precision(self) -> float:
        return self.prefetch_used / self.prefetch_loads if self.prefetch_loads else 0.0

    @property
    def prefetch_recall(self) -> float:
        """Of the experts that were not resident before prefetch, the share prefetch brought."""
        wanted = self.prefetch_used + self.demand_loads
        return self.prefetch_used / wanted if wanted else 0.0

    def summary(self) -> dict[str, float]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out.update(hit_rate=self.hit_rate, prefetch_precision=self.prefetch_precision,
                   prefetch_recall=self.prefetch_recall, loads=self.loads)
        return out


RECENT_DECAY = 0.75   # weight of the past in the recent-use average (half-life ~2.4 steps)
RECENT_WEIGHT = 0.5   # the prediction is made for this very step; the past counts half


class SlotTable:
    """expert -> slot table of one layer with S slots, driven by a :class:`Policy`."""

    def __init__(self, num_experts: int, num_slots: int, policy: Policy):
        if not 1 <= num_slots <= num_experts:
            raise ValueError(f"num_slots must be in [1, {num_experts}], got {num_slots}")
        self.num_experts, self.num_slots, self.policy = num_experts, num_slots, policy
        self.slot_E = np.full(num_experts, -1, np.int32)
        self.expert_S = np.full(num_slots, -1, np.int32)
        self.stats = LayerStats()
        self._prefetched: set[int] = set()
        self.recent_E = np.zeros(num_experts)      # average of "needed" over past steps

    def clear(self) -> None:
        """Forget every resident expert (the fetch-every-time baseline calls this each step)."""
        self.slot_E[:] = -1
        self.expert_S[:] = -1
        self._prefetched = set()

    def resident(self) -> np.ndarray:
        return self.expert_S[self.expert_S >= 0]

    def _ranked(self, experts: np.ndarray, step: int) -> np.ndarray:
        """experts sorted by priority, highest first (ties: lower id first)."""
        experts = np.asarray(experts, np.int64)
        prio = self.policy.priority(experts, step)
        return experts[np.lexsort((experts, -prio))]

    def _load(self, expert: int, slot: int) -> None:
        old = self.expert_S[slot]
        if old >= 0:
            self.slot_E[old] = -1
        self.expert_S[slot], self.slot_E[expert] = expert, slot

    def prefetch(self, pred_E: np.ndarray, step: int) -> list[tuple[int, int]]:
        """Start copies of the likeliest experts -> [(expert, slot)].

        ``pred_E``: the predicted chance x1000 (int) that the step needs each expert.
        """
        likely_E = np.asarray(pred_E) / 1000.0 + RECENT_WEIGHT * self.recent_E
        ids = np.flatnonzero(likely_E > 0)
        ids = ids[np.lexsort((ids, -likely_E[ids]))][: self.num_slots]
        new = [int(e) for e in ids if self.slot_E[e] < 0]
        protect = set(int(e) for e in ids)
        empty = [int(s) for s in np.flatnonzero(self.expert_S < 0)]
        others = [e for e in self.resident() if int(e) not in protect]
        victims = [int(self.slot_E[e]) for e in self._ranked(np.array(others, np.int64), step)[::-1]]
        loads = list(zip(new, empty + victims))
        for e, s in loads:
            self._load(e, s)
        self._prefetched = {e for e, _ in loads}
        self.stats.prefetch_loads += len(loads)
        return loads

    def access(self, need_E: np.ndarray, step: int, tokens: int = 0) -> list[Wave]:
        """Make every needed expert (count > 0) resident at some wave -> the waves to run."""
        need_ids = np.flatnonzero(np.asarray(need_E) > 0)
        needed = set(int(e) for e in need_ids)
        hits = [e for e in need_ids if self.slot_E[e] >= 0]
        misses = [int(e) for e in need_ids if self.slot_E[e] < 0]
        used = sum(1 for e in hits if int(e) in self._prefetched)
        st = self.stats
        st.steps += 1
        st.tokens += tokens
        st.accesses += len(need_ids)
        st.hits += len(hits)
        st.demand_loads += len(misses)
        st.prefetch_used += used
        st.prefetch_wasted += len(self._prefetched) - used
        self._prefetched = set()
        self.policy.touch(need_ids, step)
        self.recent_E *= RECENT_DECAY
        self.recent_E[need_ids] += 1.0 - RECENT_DECAY
        keep = self._keep_set(need_ids, misses, step)
        waves = self._waves(needed, [int(e) for e in hits], misses, keep, step)
        st.extra_waves += len(waves) - 1
        return waves

    def _keep_set(self, need_ids, misses, step) -> set[int]:
        cand = np.union1d(self.resident(), need_ids)
        ranked = [int(e) for e in self._ranked(cand, step)]
        keep = ranked[: self.num_slots]
        if misses and len(keep) == self.num_slots and all(self.slot_E[e] >= 0 for e in keep):
            miss_set = set(misses)
            best_miss = next(e for e in ranked if e in miss_set)
            keep = keep[:-1] + [best_miss]
        return set(keep)

    def _waves(self, needed, hits, misses, keep, step) -> list[Wave]:
        locked = {int(self.slot_E[e]) for e in keep if self.slot_E[e] >= 0}
        empty = [s for s in range(self.num_slots) if self.expert_S[s] < 0]
        unneeded = [int(e) for e in self.resident() if int(e) not in needed
                    and int(self.slot_E[e]) not in locked]
        unneeded_slots = [int(self.slot_E[e])
                          for e in self._ranked(np.array(unneeded, np.int64), step)[::-1]]
        hit_slots = [int(self.slot_E[e]) for e in hits if int(self.slot_E[e]) not in locked]
        age = {s: i for i, s in enumerate(empty + unneeded_slots + hit_slots)}  # older first
        in_keep = [e for e in misses if e in keep]
        out_keep = [e for e in misses if e not in keep]
        order = lambda es: [int(e) for e in self._ranked(np.array(es, np.int64), step)[::-1]]  # noqa: E731
        queue = order(out_keep) + order(in_keep)
        wave = Wave(compute={e: int(self.slot_E[e]) for e in hits})
        avail = empty + unneeded_slots              # hit slots wait until the hits are computed
        waves, clock = [], len(age)
        assert not queue or age, "a miss needs a streaming slot (keep set too large)"
        while True:
            for e, s in zip(queue, avail):
                self._load(e, s)
                wave.loads.append((e, s))
                wave.compute[e] = s
                age[s], clock = clock, clock + 1
            queue = queue[len(wave.loads):]
            waves.append(wave)
            if not queue:
                return waves
            wave = Wave()
            avail = sorted(age, key=age.get)
