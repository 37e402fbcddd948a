"""Replay a routing trace under every policy, slot count and prefetch setting.

The simulator runs the engine's own :class:`SlotTable` logic per layer (no
weights, only counts), so its hit rates are the ones the engine would see on
the same routing.

Belady's bound (:func:`belady`): after each step keep the S experts, among
the residents and the step's experts, whose next use comes soonest (Belady's
MIN, where an expert the step needs may also pass through without being
kept). It is the exact optimum of a slightly looser model than the engine's:
there a step with a miss must leave one slot free to stream it through, here
a pass-through needs no slot of its own. So it bounds the hits of every
schedule the engine could run (tests check both against brute force), and no
policy without prefetch can beat it (prefetch can, by paying extra copies).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from serve.offload.policies import ONLINE_POLICIES, make_policy
from serve.offload.slots import LayerStats, SlotTable
from serve.offload.trace import RoutingTrace, expert_frequency_LE


def layer_tables(trace: RoutingTrace, policy: str, slots_L: list[int], *,
                 frequency_LE: np.ndarray | None = None, lfru_decay: float = 0.75) -> list[SlotTable]:
    """One SlotTable per MoE layer; 'static' pins from ``frequency_LE`` (default: the trace's)."""
    if frequency_LE is None:
        frequency_LE = expert_frequency_LE(trace)
    tables = []
    for layer, slots in enumerate(slots_L):
        pol = make_policy(policy, trace.num_experts, slots, frequency_E=frequency_LE[layer],
                          lfru_decay=lfru_decay)
        tables.append(SlotTable(trace.num_experts, slots, pol))
    return tables


def belady(need_NE: np.ndarray, slots: int, tokens_N: np.ndarray | None = None) -> LayerStats:
    """Belady's clairvoyant bound for one layer (see the module docstring)."""
    need = np.asarray(need_NE) > 0
    num_steps, num_experts = need.shape
    if not 1 <= slots <= num_experts:
        raise ValueError(f"num_slots must be in [1, {num_experts}], got {slots}")
    # next_NE[n, e]: first step > n that needs e (num_steps if none)
    next_NE = np.full((num_steps + 1, num_experts), num_steps)
    for n in range(num_steps - 1, -1, -1):
        next_NE[n] = np.where(need[n + 1], n + 1, next_NE[n + 1]) if n + 1 < num_steps \
            else num_steps
    stats, state = LayerStats(), np.zeros(num_experts, bool)
    for n in range(num_steps):
        hits = int((need[n] & state).sum())
        stats.steps += 1
        stats.accesses += int(need[n].sum())
        stats.hits += hits
        stats.demand_loads += int(need[n].sum()) - hits
        stats.tokens += int(tokens_N[n]) if tokens_N is not None else 0
        cand = np.flatnonzero(need[n] | state)
        cand = cand[np.lexsort((cand, next_NE[n, cand]))]
        state[:] = False
        state[cand[:slots]] = True
    return stats


def simulate(trace: RoutingTrace, policy: str, slots: int | list[int], *, prefetch: bool = False,
             frequency_LE: np.ndarray | None = None, lfru_decay: float = 0.75) -> list[LayerStats]:
    """Replay the trace; per-layer counters. ``slots``: one count for all layers, or per layer."""
    slots_L = [slots] * trace.num_layers if isinstance(slots, int) else list(slots)
    if len(slots_L) != trace.num_layers:
        raise ValueError(f"slots: {len(slots_L)} budgets for {trace.num_layers} MoE layers")
    if prefetch and trace.pred_NLE is None:
        raise ValueError("prefetch: this trace holds no router predictions (pred_NLE)")
    if policy == "belady":
        if prefetch:
            raise ValueError("belady is the demand-cache bound; it takes no prefetch")
        return [belady(trace.need_NLE[:, layer], s, trace.tokens_N) for layer, s in enumerate(slots_L)]
    tables = layer_tables(trace, policy, slots_L, frequency_LE=frequency_LE, lfru_decay=lfru_decay)
    for step in range(trace.num_steps):
        for layer, table in enumerate(tables):
            if prefetch:
                table.prefetch(trace.pred_NLE[step, layer], step)
            table.access(trace.need_NLE[step, layer], step, tokens=int(trace.tokens_N[step]))
    return [t.stats for t in tables]


def total(stats_L: list[LayerStats]) -> LayerStats:
    out = LayerStats()
    for s in stats_L:
        out = out + s
    out.tokens = stats_L[0].tokens if stats_L else 0   # every layer sees the same tokens
    out.steps = stats_L[0].steps if stats_L else 0
    return out


@dataclass(frozen=True)
class SweepRow:
    policy: str
    slots: int
    prefetch: bool
    hit_rate: float
    loads_per_token: float       # expert copies host->device per token (all layers)
    prefetch_precision: float
    prefetch_recall: float
    extra_waves: int


def sweep(trace: RoutingTrace, *, policies=ONLINE_POLICIES + ("belady",), slot_counts=None,
          prefetch_settings=(False, True)) -> list[SweepRow]:
    """Every policy x slot count (default top_k..E) x prefetch setting, plus Belady."""
    if slot_counts is None:
        slot_counts = range(trace.top_k, trace.num_experts + 1)
    rows = []
    for slots in slot_counts:
        for policy in policies:
            for pf in prefetch_settings:
                if pf and (policy == "belady" or trace.pred_NLE is None):
                    continue
                t = total(simulate(trace, policy, slots, prefetch=pf))
                rows.append(SweepRow(policy, slots, pf, t.hit_rate, t.loads / max(t.tokens, 1),
                                     t.prefetch_precision, t.prefetch_recall, t.extra_waves))
    return rows


def format_table(rows: list[SweepRow], expert_bytes: int | None = None) -> str:
    """Hit rate per (policy, prefetch) against slot count; optional bytes/token column block."""
    keys = sorted({(r.policy, r.prefetch) for r in rows}, key=lambda k: (k[0] == "belady", k))
    slot_counts = sorted({r.slots for r in rows})
    by = {(r.policy, r.prefetch, r.slots): r for r in rows}
    label = lambda k: f"{k[0]}{'+pf' if k[1] else ''}"  # noqa: E731
    head = "hit rate      " + "".join(f"{s:>8d}" for s in slot_counts)
    lines = [head]
    for k in keys:
        lines.append(f"{label(k):<14s}" + "".join(
            f"{by[(*k, s)].hit_rate:8.3f}" if (*k, s) in by else " " * 8 for s in slot_counts))
    if expert_bytes:
        lines.append("")
        lines.append("KiB/token     " + "".join(f"{s:>8d}" for s in slot_counts))
        for k in keys:
            lines.append(f"{label(k):<14s}" + "".join(
                f"{by[(*k, s)].loads_per_token * expert_bytes / 1024:8.1f}" if (*k, s) in by
                else " " * 8 for s in slot_counts))
    return "\n".join(lines)


def plot(rows: list[SweepRow], path, title: str = "") -> None:
    """PNG of hit rate against slots per layer, one line per policy (dashed: with prefetch)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for key in sorted({(r.policy, r.prefetch) for r in rows}):
        pts = sorted((r.slots, r.hit_rate) for r in rows if (r.policy, r.prefetch) == key)
        style = dict(color="black", linewidth=2.2) if key[0] == "belady" else {}
        ax.plot(*zip(*pts), "--" if key[1] else "-", marker="o", markersize=3,
                label=f"{key[0]}{' + prefetch' if key[1] else ''}", **style)
    ax.set_xlabel("device slots per MoE layer")
    ax.set_ylabel("hit rate")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "expert cache hit rate")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
