"""Expert-cache policies and slot logic against hand-worked cases, a plain LRU and brute force."""

import itertools
from collections import OrderedDict
from functools import lru_cache

import numpy as np
import pytest

from serve.offload.policies import ONLINE_POLICIES, make_policy
from serve.offload.slots import SlotTable
from serve.offload.trace import RoutingTrace, budgets_from_trace
from serve.offload.tracesim import layer_tables, simulate, sweep, total


def trace_of(steps, num_experts, top_k=1, pred=None):
    """steps: list of expert-id lists of one layer -> a one-layer RoutingTrace."""
    need = np.zeros((len(steps), 1, num_experts), np.int32)
    for n, ids in enumerate(steps):
        need[n, 0, ids] = 1
    pred_NLE = None
    if pred is not None:
        pred_NLE = np.zeros_like(need)
        for n, ids in enumerate(pred):
            pred_NLE[n, 0, ids] = 1000     # predicted as sure
    return RoutingTrace(need, np.ones(len(steps), np.int64), top_k, pred_NLE)


def random_trace(rng, steps, num_experts, max_set, layers=1, skew=1.0):
    p = rng.dirichlet(np.full(num_experts, skew))
    need = np.zeros((steps, layers, num_experts), np.int32)
    for n, l in itertools.product(range(steps), range(layers)):
        k = rng.integers(1, max_set + 1)
        need[n, l, rng.choice(num_experts, size=k, replace=False, p=p)] = 1
    guessed = np.where(rng.random(need.shape) < 0.8, need, rng.integers(0, 2, need.shape))
    pred = guessed * rng.integers(1, 1001, need.shape)      # chances x 1000
    return RoutingTrace(need, np.full(steps, 2), 1, pred)


def brute_force_min_loads(need_NE, slots, *, pass_through_slot=False):
    """Fewest copies over every schedule of the engine's slot model (any keep set, waves).

    The engine must keep a slot free to stream a miss through; with
    ``pass_through_slot`` that rule is dropped (the looser model Belady solves).
    """
    need = [frozenset(np.flatnonzero(row)) for row in need_NE]

    @lru_cache(maxsize=None)
    def best(t, state):
        if t == len(need):
            return 0
        misses = need[t] - state
        cand = sorted(state | need[t])
        out = np.inf
        for size in range(slots + 1):
            for keep in itertools.combinations(cand, size):
                keep = frozenset(keep)
                if misses and len(keep & state) > slots - 1 and not pass_through_slot:
                    continue            # a miss needs a slot to stream through
                out = min(out, len(misses) + best(t + 1, keep))
        return out

    return best(0, frozenset())


def test_lru_lfu_belady_hand_worked():
    steps = [[0], [1], [0], [2], [1], [0]]
    tr = trace_of(steps, 4)
    lru, lfu, bel = (total(simulate(tr, p, 2)) for p in ("lru", "lfu", "belady"))
    # LRU: m m h m(evict 1) m(evict 0) m(evict 2)
    assert (lru.hits, lru.demand_loads) == (1, 5)
    # LFU: m m h m(evict 1: count 1 < 2) m(evict 2) h
    assert (lfu.hits, lfu.demand_loads) == (2, 4)
    # Belady: m m h, 2 passes through (never used again), h h
    assert (bel.hits, bel.demand_loads) == (3, 3)
    # belady keeps 0 and 1 (next uses 2, 4) over 2 (unused again) in a 2-slot, 3-step trace
    assert total(simulate(trace_of([[0], [1], [2], [0], [1]], 3), "belady", 2)).hits == 2


def test_lfru_decay_prefers_recent_over_old_frequency():
    # expert 0 used 3 times long ago, expert 1 used once just now: LFU keeps 0, LFRU (decay .5) keeps 1
    steps = [[0], [0], [0], [3], [3], [3], [1], [2], [1]]
    lfu = total(simulate(trace_of(steps, 4), "lfu", 2))
    lfru = total(simulate(trace_of(steps, 4), "lfru", 2, lfru_decay=0.5))
    assert lfru.hits == lfu.hits + 1


def reference_lru(need_NE, slots):
    """Textbook LRU over step sets (every set fits): hits."""
    cache, hits = OrderedDict(), 0
    for row in need_NE:
        ids = sorted(np.flatnonzero(row))
        for e in ids:
            if e in cache:
                hits += 1
        for e in ids:
            cache.pop(e, None)
        while len(cache) + len(ids) > slots:
            cache.popitem(last=False)   # the oldest goes
        for e in ids[::-1]:             # ties inside a step: the lower id counts as more recent
            cache[e] = True
    return hits


@pytest.mark.parametrize("seed", range(6))
def test_lru_hit_count_matches_textbook_lru(seed):
    rng = np.random.default_rng(seed)
    tr = random_trace(rng, 60, 8, 3, skew=0.5)
    for slots in (3, 4, 6):
        st = total(simulate(tr, "lru", slots))
        assert st.hits == reference_lru(tr.need_NLE[:, 0], slots)
        assert st.hits + st.demand_loads == st.accesses == int((tr.need_NLE > 0).sum())


@pytest.mark.parametrize("seed", range(8))
def test_belady_equals_brute_force_optimum(seed):
    rng = np.random.default_rng(100 + seed)
    tr = random_trace(rng, 7, 5, 3, skew=0.7)     # sets up to 3 > slots 2: waves included
    for slots in (1, 2, 3):
        opt = brute_force_min_loads(tr.need_NLE[:, 0], slots)
        relaxed = brute_force_min_loads(tr.need_NLE[:, 0], slots, pass_through_slot=True)
        assert total(simulate(tr, "belady", slots)).demand_loads == relaxed <= opt
        for policy in ONLINE_POLICIES:
            assert total(simulate(tr, policy, slots)).demand_loads >= opt


@pytest.mark.parametrize("seed", range(5))
def test_belady_bounds_every_policy_on_random_traces(seed):
    rng = np.random.default_rng(seed)
    tr = random_trace(rng, 150, 12, 5, layers=2, skew=0.3)
    for slots in (1, 2, 4, 7, 12):
        best = total(simulate(tr, "belady", slots)).hit_rate
        for policy in ONLINE_POLICIES:
            assert total(simulate(tr, policy, slots)).hit_rate <= best + 1e-12, (policy, slots)
    full = total(simulate(tr, "lru", 12))
    assert full.demand_loads == len(np.flatnonzero(tr.need_NLE.sum(0)))   # cold misses only


def check_waves(table, need_E, waves, before_S):
    """Every needed expert is computed once, from a slot that holds it at that wave."""
    slots_S = before_S.copy()
    computed = []
    for wave in waves:
        for e, s in wave.loads:
            slots_S[s] = e
        for e, s in wave.compute.items():
            assert slots_S[s] == e
            computed.append(e)
    assert sorted(computed) == sorted(np.flatnonzero(need_E))
    np.testing.assert_array_equal(slots_S, table.expert_S)
    assert all(table.slot_E[e] == s for s, e in enumerate(table.expert_S) if e >= 0)


@pytest.mark.parametrize("policy", ONLINE_POLICIES)
def test_waves_compute_every_needed_expert_once(policy):
    rng = np.random.default_rng(7)
    tr = random_trace(rng, 40, 10, 9, skew=0.5)
    for slots in (1, 3, 5):
        pol = make_policy(policy, 10, slots, frequency_E=tr.need_NLE[:, 0].sum(0))
        table = SlotTable(10, slots, pol)
        for step in range(tr.num_steps):
            table.prefetch(tr.pred_NLE[step, 0], step)
            before = table.expert_S.copy()
            need = tr.need_NLE[step, 0]
            waves = table.access(need, step)
            check_waves(table, need, waves, before)
            n_need = int((need > 0).sum())
            assert len(waves) >= -(-n_need // slots)


def test_prefetch_counts():
    # slots 2; step 1 predicts {1, 2} and needs {1, 3}: one used, one wasted, one stall
    tr = trace_of([[0], [1, 3]], 4, pred=[[], [1, 2]])
    st = total(simulate(tr, "lru", 2, prefetch=True))
    assert (st.prefetch_loads, st.prefetch_used, st.prefetch_wasted) == (2, 1, 1)
    assert (st.hits, st.demand_loads) == (1, 2)
    assert st.prefetch_precision == 0.5 and st.prefetch_recall == 1 / 3


def test_prefetch_ranks_prediction_plus_recent_use():
    # slots 2. Step 0 needs {0}, so 0 has recent use 0.25 (RECENT_DECAY 0.75), weighted 0.5.
    # Step 1 predicts 1 at 0.9 and 2 at 0.1: the likeliest two are 1 (0.9) and 0 (0.125).
    need = np.zeros((2, 1, 4), np.int32)
    need[0, 0, 0] = need[1, 0, 1] = 1
    pred = np.zeros_like(need)
    pred[1, 0, 1], pred[1, 0, 2] = 900, 100
    tr = RoutingTrace(need, np.ones(2, np.int64), 1, pred)
    table = layer_tables(tr, "lru", [2])[0]
    table.access(need[0, 0], 0)
    assert table.prefetch(pred[1, 0], 1) == [(1, 1)]
    assert sorted(table.resident()) == [0, 1]
    # recent use decays: three steps needing only 3 leave 0 at 0.079, 1 at 0.105, 3 at 0.578
    # (halved: 0.04, 0.05, 0.29), so a guess of 0.3 for expert 2 outranks 0 and 1: {2, 3} stay
    table.access(need[1, 0], 1)
    for step in (2, 3, 4):
        table.access(np.eye(4, dtype=np.int32)[3], step)
    np.testing.assert_allclose(table.recent_E, [0.25 * 0.75 ** 4, 0.25 * 0.75 ** 3, 0,
                                                1 - 0.75 ** 3])
    table.prefetch(np.array([0, 0, 300, 0]), 5)
    assert sorted(table.resident()) == [2, 3]


def test_sweep_rows_and_bad_inputs():
    rng = np.random.default_rng(0)
    tr = random_trace(rng, 20, 6, 2, layers=2)
    rows = sweep(tr, slot_counts=(1, 6))
    assert {r.policy for r in rows} == set(ONLINE_POLICIES) | {"belady"}
    all_slots = [r.hit_rate for r in rows if r.slots == 6 and not r.prefetch]
    assert len(all_slots) == 5 and len(set(all_slots)) == 1     # only cold misses remain
    with pytest.raises(ValueError, match="unknown policy"):
        simulate(tr, "fifo", 2)
    with pytest.raises(ValueError, match="num_slots"):
        simulate(tr, "lru", 7)
    with pytest.raises(ValueError, match="belady"):
        simulate(tr, "belady", 2, prefetch=True)


def test_budgets_from_trace_give_churning_layers_more():
    rng = np.random.default_rng(1)
    need = np.zeros((50, 2, 8), np.int32)
    need[:, 0, :2] = 1                                   # layer 0 repeats the same experts
    for n in range(50):
        need[n, 1, rng.choice(8, 2, replace=False)] = 1  # layer 1 churns
    tr = RoutingTrace(need, np.ones(50), 2)
    budgets = budgets_from_trace(tr, 8)
    assert sum(budgets) == 8 and budgets[1] > budgets[0] >= 1
    with pytest.raises(ValueError, match="total_slots"):
        budgets_from_trace(tr, 1)


def test_trace_roundtrip(tmp_path):
    rng = np.random.default_rng(2)
    tr = random_trace(rng, 5, 4, 2, layers=3)
    tr.save(tmp_path / "t.npz")
    back = RoutingTrace.load(tmp_path / "t.npz")
    np.testing.assert_array_equal(back.need_NLE, tr.need_NLE)
    np.testing.assert_array_equal(back.pred_NLE, tr.pred_NLE)
    assert back.top_k == tr.top_k
