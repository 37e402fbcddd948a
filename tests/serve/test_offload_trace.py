"""Recording routing from generations, the trace-sim driver, and OffloadConfig validation."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from serve.offload import record
from serve.offload.config import OffloadConfig, OffloadConfigError
from serve.offload.offloaded import OffloadedModel
from serve.offload.trace import RoutingTrace
from serve.offload.tracesim_cli import run
from tests.serve.offload_helpers import host_store, small_model


@pytest.fixture(scope="module")
def model():
    return small_model(num_experts=6, top_k=2)


def test_recorded_routing_is_the_offloaded_forward_routing(model):
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9]]
    logits, chosen, pred = record._routing(model, jnp.asarray([p + [0] * (5 - len(p)) for p in prompts]))
    ref = nnx.jit(lambda m, t: m(t)[0])(model, jnp.asarray([p + [0] * (5 - len(p)) for p in prompts]))
    np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-5)
    trace = record.record(model, prompts, max_new_tokens=3, batch_size=2, chunk=8)
    assert trace.num_steps == 1 + 2 and list(trace.tokens_N) == [8, 2, 2]
    # the prefill step as the offloaded engine sees it (padding masked)
    tokens = np.zeros((2, 5), np.int32)
    valid = np.zeros((2, 5), bool)
    for b, p in enumerate(prompts):
        tokens[b, :len(p)], valid[b, :len(p)] = p, True
    om = OffloadedModel(model, host_store(model), [6, 6], prefetch=True, record=True)
    om.forward(tokens, valid_BS=valid)[0]
    seen = om.trace()
    np.testing.assert_array_equal(seen.need_NLE[0], trace.need_NLE[0])
    # prefetch weights (x1000, rounded): summed in a different order, so within one unit
    np.testing.assert_allclose(seen.pred_NLE[0], trace.pred_NLE[0], atol=1)
    assert seen.pred_NLE[0].sum() > 0


def test_steps_of_batch():
    steps = record.steps_of_batch([3, 1], new_tokens=3, chunk=2)
    assert steps == [[(0, 0), (0, 1), (1, 0)], [(0, 2)], [(0, 3), (1, 1)], [(0, 4), (1, 2)]]


def test_greedy_matches_argmax_of_full_forward(model):
    tokens = record.greedy(model, [[3, 1, 4]], 4)
    for n in range(4):
        logits = nnx.jit(lambda m, t: m(t)[0])(model, jnp.asarray(tokens[:, :3 + n]))
        assert tokens[0, 3 + n] == int(np.argmax(logits[0, -1]))


def test_trace_sim_run_writes_table_png_and_trace(model, tmp_path):
    table = run(model, [[1, 2, 3], [4, 5, 6, 7], [9]], tmp_path, max_new_tokens=4, batch_size=2,
                expert_bytes=1024, slot_counts=(2, 4))
    assert "belady" in table and "lru+pf" in table and "KiB/token" in table
    assert (tmp_path / "hit_rate.png").stat().st_size > 1000
    trace = RoutingTrace.load(tmp_path / "trace.npz")
    assert trace.num_layers == 2 and trace.num_experts == 6


def test_offload_config_errors_name_the_field(tmp_path):
    for kwargs, field in [(dict(slots_per_layer=0), "slots_per_layer"),
                          (dict(policy="fifo"), "policy"),
                          (dict(store="gpu"), "store"),
                          (dict(policy="static"), "trace"),
                          (dict(budgets="trace"), "trace"),
                          (dict(trace=str(tmp_path / "none.npz")), "trace"),
                          (dict(store="disk", path=str(tmp_path / "nowhere")), "path"),
                          (dict(prefetch="yes"), "prefetch")]:
        with pytest.raises(OffloadConfigError, match=f"OffloadConfig.{field}"):
            OffloadConfig(**kwargs)
    with pytest.raises(OffloadConfigError, match="slots_per_layer.*only 6 experts"):
        OffloadConfig(slots_per_layer=7).resolve(2, 6)


def test_offload_config_budgets_from_trace():
    need = np.zeros((10, 2, 6), np.int32)
    need[:, 0, :2] = 1
    need[np.arange(10), 1, np.arange(10) % 6] = 1
    need[np.arange(10), 1, (np.arange(10) + 3) % 6] = 1
    trace = RoutingTrace(need, np.ones(10), 2)
    slots, freq = OffloadConfig(slots_per_layer=3, budgets="trace", trace=trace).resolve(2, 6)
    assert sum(slots) == 6 and slots[1] > slots[0]
    assert freq.shape == (2, 6)
    with pytest.raises(OffloadConfigError, match="trace"):
        OffloadConfig(trace=trace).resolve(3, 6)
