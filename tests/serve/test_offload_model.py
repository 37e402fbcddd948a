"""The offloaded layer-by-layer forward against the model's own forward and the all-resident run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moejax
from moejax import dispatch as dispatch_lib
from moejax.experts import FloatExpertWeights
from serve.offload.offloaded import OffloadedModel
from serve.offload.pool import SlotPool, wave_compute
from serve.offload.policies import ONLINE_POLICIES
from serve.offload.store import memory_kinds
from tests.serve.offload_helpers import disk_store, host_store, small_model, stacked_experts

E = 6


@pytest.fixture(scope="module")
def setup():
    model = small_model(num_experts=E, top_k=2, shared=1)
    tokens = jax.random.randint(jax.random.key(1), (3, 10), 0, 64)
    ref = nnx.jit(lambda m, t: m(t)[0])(model, tokens)
    resident = OffloadedModel(model, host_store(model), [E, E], prefetch=False).forward(tokens)[0]
    return model, tokens, ref, resident


def test_wave_compute_matches_dense_reference():
    rng = np.random.default_rng(0)
    T, K, D, F, S = 9, 2, 8, 12, 3
    w = {n: jnp.asarray(rng.normal(size=s).astype(np.float32)) for n, s in
         (("w_gate", (E, D, F)), ("w_up", (E, D, F)), ("w_down", (E, F, D)))}
    x_TD = jnp.asarray(rng.normal(size=(T, D)).astype(np.float32))
    experts_TK = jnp.asarray(np.stack([rng.choice(E, K, replace=False) for _ in range(T)]))
    gates_TK = jnp.full((T, K), 0.5)
    valid_T = jnp.asarray(np.arange(T) != 4)            # a padding token: its outputs stay 0
    ref_TD, _ = dispatch_lib.dense_dispatch(
        x_TD, gates_TK, experts_TK, FloatExpertWeights(w["w_gate"], w["w_up"], w["w_down"]))
    pool = SlotPool({n: (a.shape[1:], a.dtype) for n, a in w.items()}, S)
    y_TKD = jnp.zeros((T, K, D))
    for first in range(0, E, S):                          # two waves over three slots
        slot_E = np.full(E, -1, np.int32)
        for s, e in enumerate(range(first, first + S)):
            pool.load(s, {n: a[e] for n, a in w.items()})
            slot_E[e] = s
        y_TKD = wave_compute(pool.arrays, x_TD, experts_TK, valid_T, y_TKD, jnp.asarray(slot_E),
                             gmm_backend="xla")
    out_TD = jnp.einsum("tkd,tk->td", y_TKD, gates_TK)
    np.testing.assert_allclose(out_TD[valid_T], ref_TD[valid_T], rtol=2e-5, atol=2e-5)
    assert float(jnp.abs(out_TD[4]).max()) == 0.0


def test_resident_layerwise_matches_model_forward(setup):
    _, _, ref, resident = setup
    # separate jit programs: float32 reassociation only
    np.testing.assert_allclose(resident, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("policy", ONLINE_POLICIES)
def test_offloaded_equals_resident_every_slot_count(setup, policy):
    model, tokens, _, resident = setup
    store = host_store(model)
    freq = np.ones((2, E))
    for slots in (1, 3):
        for prefetch in (False, True):
            om = OffloadedModel(model, store, [slots, slots], policy=policy, prefetch=prefetch,
                                frequency_LE=freq)
            for step in range(2):      # the second step starts from a warm table
                np.testing.assert_array_equal(om.forward(tokens)[0], resident)
            for st in om.layer_stats():
                assert st.hits + st.demand_loads == st.accesses
                assert st.prefetch_used + st.prefetch_wasted == st.prefetch_loads


def test_counters_and_bytes(setup):
    model, tokens, _, _ = setup
    store = host_store(model)
    om = OffloadedModel(model, store, [1, 3], prefetch=True)
    om.forward(tokens)[0]
    stats = om.layer_stats()
    loads = sum(s.loads for s in stats)
    assert store.bytes_to_device == loads * store.expert_bytes
    assert store.expert_bytes == 3 * 32 * 48 * 4
    # every expert any valid token routes to is accessed once in the step
    assert all(s.accesses == E for s in stats)   # 30 tokens x top-2 touch every one of 6 experts
    assert all(s.tokens == tokens.size for s in stats)


def test_padding_tokens_do_not_fetch(setup):
    model, tokens, _, resident = setup
    valid = np.zeros(tokens.shape, bool)
    valid[0, :1] = True                       # one real token: only its top-2 experts per layer
    om = OffloadedModel(model, host_store(model), [E, E], prefetch=False)
    out = om.forward(tokens, valid_BS=valid)[0]
    assert all(s.accesses == 2 for s in om.layer_stats())
    np.testing.assert_array_equal(out[0, 0], resident[0, 0])


def test_host_store_is_pinned_where_available():
    model = small_model()
    store = host_store(model)
    expected = "pinned_host" if "pinned_host" in memory_kinds() else "numpy"
    assert store.memory_kind == expected
    fetched = store.fetch(0, 3)
    np.testing.assert_array_equal(fetched["w_up"], stacked_experts(model)[0]["w_up"][3])
    assert host_store(model, pin=False).memory_kind == "numpy"


def test_disk_store_reads_experts_and_counts_bytes(setup, tmp_path):
    model, tokens, _, resident = setup
    store = disk_store(model, tmp_path / "experts.safetensors")
    om = OffloadedModel(model, store, [3, 3], policy="lfu", prefetch=True)
    np.testing.assert_array_equal(om.forward(tokens)[0], resident)
    loads = sum(s.loads for s in om.layer_stats())
    assert store.bytes_from_disk == store.bytes_to_device == loads * store.expert_bytes > 0


def test_fetch_every_time_baseline_never_hits(setup):
    model, tokens, _, resident = setup
    om = OffloadedModel(model, host_store(model), [3, 3], prefetch=False)
    om.reuse = False
    for _ in range(2):
        np.testing.assert_array_equal(om.forward(tokens)[0], resident)
    assert all(s.hits == 0 and s.demand_loads == s.accesses for s in om.layer_stats())


def test_memory_layers_decode_with_their_state_and_lookback():
    """Engram (token look-back, conv window as decode state) alone and beside an MoE: the
    cached offloaded decode in chunks equals the model's full forward, also for a row that
    restarts at position 0 in a slot that held another sequence."""
    mem = moejax.MemoryConfig(ngram_table_rows=256, ngram_d_row=8, ngram_heads=2, num_slots=64,
                              d_key=16, top_k=4, num_heads=2)
    model = small_model(num_experts=4, n_layers=2, kinds=("engram+moe", "engram"), memory=mem)
    for b in model.layers:         # conv starts at zero; make the window count
        conv = b.ffn.memory.conv if hasattr(b.ffn, "memory") else b.ffn.conv
        conv[...] = jax.random.normal(jax.random.key(3), conv.shape)
    full = nnx.jit(lambda m, t: m(t)[0])
    om = OffloadedModel(model, host_store(model), [1], prefetch=False)
    caches = om.init_caches(1, 16)
    for tokens in ([3, 9, 4, 1, 7, 2], [5, 6, 5, 6, 1, 1]):   # the second restarts the row
        tokens = np.array([tokens], np.int32)
        steps = []
        for t in range(0, 6, 2):
            logits, caches = om.forward(tokens[:, t:t + 2], jnp.arange(t, t + 2)[None],
                                        np.ones((1, 2), bool), caches)
            steps.append(logits)
        np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full(model, jnp.asarray(tokens)),
                                   rtol=1e-5, atol=1e-5)


def test_capacity_dispatch_drops_the_same_pairs():
    """With a capacity factor the resident MoE drops the pairs past each expert's capacity;
    the offloaded forward drops the same ones (and fetches no expert only they need)."""
    model = small_model(num_experts=4, n_layers=2, capacity_factor=0.5)
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 64)
    ref, aux = nnx.jit(lambda m, t: m(t))(model, tokens)
    assert float(aux["dropped_fraction"]) > 0
    om = OffloadedModel(model, host_store(model), [1, 1], prefetch=False)
    np.testing.assert_allclose(om.forward(tokens)[0], ref, rtol=1e-5, atol=1e-5)
