"""serve.Engine with offloaded experts: greedy tokens equal the all-resident engine's.

Covers slot counts >= 1, every policy, prefetch on and off, host and disk
stores, single prompts, batches of different lengths and continuous batching
(requests joining a running batch); the cached layer-by-layer decode's logits
against the full forward; bad configs; telemetry in stats and /metrics.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moejax
import serve
from moejax import checkpoint as mckpt
from serve.metrics import prometheus_text
from serve.offload.offloaded import OffloadedModel
from tests.serve.offload_helpers import host_store, small_model

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [1, 2], [30, 31, 32, 33]]
ENGINE = dict(num_slots=3, max_len=32, max_chunk=4)
NEW = 5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("offload")
    # a dense layer, an MoE, and an MoE beside an n-gram memory (token look-back, decode state)
    model = small_model(num_experts=6, top_k=2, shared=1, kinds=("dense", "moe", "engram+moe"),
                        memory=moejax.MemoryConfig(ngram_table_rows=256, ngram_d_row=8, ngram_heads=2))
    mckpt.save_model(root / "run", model, model.cfg)
    serve.export(root / "run", root / "serving")
    resident = serve.Engine.load(root / "serving", **ENGINE)
    solo = [resident.generate([p], max_new_tokens=NEW)[0].tokens for p in PROMPTS]
    batch = [o.tokens for o in resident.generate(PROMPTS, max_new_tokens=NEW)]
    return root / "serving", model, solo, batch


def offloaded(directory, **cfg):
    return serve.Engine.load(directory, offload=serve.OffloadConfig(**cfg), **ENGINE)


@pytest.mark.parametrize("cfg", [
    dict(slots_per_layer=1, policy="lfu", prefetch=True, store="disk"),
    dict(slots_per_layer=2, policy="lfru", prefetch=False),
    dict(slots_per_layer=3, policy="lru", prefetch=True, store="disk"),
])
def test_generate_equals_resident(checkpoint, cfg):
    path, _, solo, batch = checkpoint
    engine = offloaded(path, **cfg)
    assert [o.tokens for o in engine.generate(PROMPTS, max_new_tokens=NEW)] == batch
    assert engine.generate([PROMPTS[0]], max_new_tokens=NEW)[0].tokens == solo[0]
    figures = engine.stats()["expert_store"]
    assert 0 <= figures["hit_rate"] <= 1 and figures["slots"] == 2 * cfg["slots_per_layer"]
    if cfg.get("store") == "disk":
        assert figures["bytes_disk_to_host_per_token"] == figures["bytes_host_to_device_per_token"] > 0
    else:
        assert figures["bytes_disk_to_host_per_token"] == 0
    if not cfg["prefetch"]:
        assert figures["prefetch_precision"] == 0 and figures["prefetch_recall"] == 0
    text = prometheus_text(engine.stats(), {})
    assert "moejax_expert_store_hit_rate" in text
    assert "moejax_expert_store_bytes_host_to_device_per_token" in text
    assert "moejax_expert_store_layer1_hit_rate" in text


def test_int8_experts_offload_like_the_resident_int8_engine(checkpoint, tmp_path):
    path, _, _, float_batch = checkpoint
    serve.export(path.parent / "run", tmp_path / "int8", quantize="int8")
    resident = serve.Engine.load(tmp_path / "int8", **ENGINE)
    want = [o.tokens for o in resident.generate(PROMPTS, max_new_tokens=NEW)]
    float_bytes = offloaded(path, slots_per_layer=2).offloaded.store.expert_bytes
    engine = offloaded(tmp_path / "int8", slots_per_layer=1, policy="lru", store="disk")
    assert [o.tokens for o in engine.generate(PROMPTS, max_new_tokens=NEW)] == want
    # int8 weights + float32 per-channel scales: a bit over a quarter of the float32 copy
    assert float_bytes / 4 < engine.offloaded.store.expert_bytes < float_bytes / 3


def test_warmup_compiles_every_piece_and_leaves_no_trace(checkpoint, caplog):
    """After warmup() serving compiles nothing (so --stats figures are serving only) and
    the warm-up's copies are not in the figures; tokens stay the resident engine's."""
    import jax
    path, _, _, batch = checkpoint
    engine = offloaded(path, slots_per_layer=2, store="disk")
    engine.warmup()
    figures = engine.stats()["expert_store"]
    assert figures["tokens"] == 0 and figures["bytes_disk_to_host_per_token"] == 0
    assert engine.offloaded.store.bytes_to_device == 0
    with jax.log_compiles(True), caplog.at_level("WARNING"):
        assert [o.tokens for o in engine.generate(PROMPTS, max_new_tokens=NEW)] == batch
    assert [r.message for r in caplog.records if "Compiling" in r.message] == []


def test_static_policy_and_trace_budgets(checkpoint, tmp_path):
    path, model, _, batch = checkpoint
    from serve.offload import record
    trace = record.record(model, PROMPTS, max_new_tokens=NEW, batch_size=3, chunk=4)
    trace.save(tmp_path / "trace.npz")
    for cfg in (dict(policy="static", trace=str(tmp_path / "trace.npz"), prefetch=False),
                dict(policy="lru", budgets="trace", trace=trace)):
        engine = offloaded(path, slots_per_layer=2, **cfg)
        assert [o.tokens for o in engine.generate(PROMPTS, max_new_tokens=NEW)] == batch


def test_continuous_batching_equals_solo(checkpoint):
    path, _, solo, _ = checkpoint
    engine = offloaded(path, slots_per_layer=1, policy="lru", prefetch=False)
    params = serve.SamplingParams(max_new_tokens=NEW)
    first = engine.submit(engine.make_request(PROMPTS[0], params))
    engine.step()
    engine.step()
    later = [engine.submit(engine.make_request(p, params)) for p in PROMPTS[1:]]
    while engine.step():
        pass
    assert [r.generated for r in [first, *later]] == solo


def test_a_copy_that_fails_mid_step_leaves_no_stale_slot(checkpoint):
    """A store read that raises part-way through a step: the step's requests fail, and the
    next generate still equals the resident engine (the slot table had recorded loads whose
    copies never happened; computing from those slots gave other tokens)."""
    path, _, _, batch = checkpoint
    engine = offloaded(path, slots_per_layer=2, prefetch=False)
    store, fetch, calls = engine.offloaded.store, engine.offloaded.store.fetch, []

    def failing_third_copy(layer, expert):
        calls.append((layer, expert))
        if len(calls) == 3:
            raise OSError("read failed")
        return fetch(layer, expert)

    store.fetch = failing_third_copy
    with pytest.raises(OSError, match="read failed"):
        engine.generate(PROMPTS, max_new_tokens=NEW)
    assert [o.tokens for o in engine.generate(PROMPTS, max_new_tokens=NEW)] == batch


def test_cached_decode_logits_match_full_forward(checkpoint):
    _, model, _, _ = checkpoint
    tokens = np.array([[3, 9, 4, 1, 7, 2, 8, 5]], np.int32)
    full = nnx.jit(lambda m, t: m(t)[0])(model, jnp.asarray(tokens))
    runs = []
    for slots in (1, 6):
        om = OffloadedModel(model, host_store(model), [slots, slots], prefetch=True)
        caches = om.init_caches(1, 16)
        logits, caches = om.forward(tokens[:, :5], jnp.arange(5)[None], np.ones((1, 5), bool), caches)
        steps = [logits]
        for t in range(5, 8):
            logit, caches = om.forward(tokens[:, t:t + 1], jnp.array([[t]]), np.ones((1, 1), bool), caches)
            steps.append(logit)
        runs.append(jnp.concatenate(steps, axis=1))
    np.testing.assert_array_equal(runs[0], runs[1])          # 1 slot == every expert resident
    np.testing.assert_allclose(runs[0], full, rtol=1e-5, atol=1e-5)


def test_bad_offload_configs_name_the_field(checkpoint, tmp_path):
    path, _, _, _ = checkpoint
    with pytest.raises(serve.OffloadConfigError, match="slots_per_layer.*only 6 experts"):
        offloaded(path, slots_per_layer=7)
    with pytest.raises(serve.OffloadConfigError, match="OffloadConfig.slots_per_layer"):
        offloaded(path, slots_per_layer=0)
    with pytest.raises(serve.OffloadConfigError, match="OffloadConfig.policy"):
        offloaded(path, policy="mru")
    with pytest.raises(serve.OffloadConfigError, match="OffloadConfig.path.*does not hold"):
        offloaded(path, store="disk", path=str(tmp_path))
