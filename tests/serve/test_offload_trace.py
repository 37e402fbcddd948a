"""Recording routing from generations, the trace-sim driver, and OffloadConfig validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moejax

from serve.offload import record
from serve.offload.config import OffloadConfig, OffloadConfigError
from serve.offload.offloaded import OffloadedModel
from serve.offload.trace import RoutingTrace
from serve.offload.tracesim_cli import expert_bytes, run
from tests.serve.offload_helpers import host_store, small_model


@pytest.fixture(scope="module")
def model():
    return small_model(num_experts=6, top_k=2)


def test_recorded_routing_is_the_offloaded_forward_routing(model):
    """Every step the trace holds (two prefill chunks, decode steps) equals what the cached
    layer-by-layer engine forward needed and predicted on the same tokens."""
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9]]
    padded = jnp.asarray([p + [0] * (5 - len(p)) for p in prompts])
    logits, _, _ = record._routing(model, padded, jnp.full(padded.shape, -1))
    ref = nnx.jit(lambda m, t: m(t)[0])(model, padded)
    np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-5)
    new, chunk = 3, 3
    trace = record.record(model, prompts, max_new_tokens=new, batch_size=2, chunk=chunk)
    assert trace.num_steps == 2 + 2 and list(trace.tokens_N) == [6, 2, 2, 2]
    tokens = record.greedy(model, prompts, new)
    lengths = np.array([len(p) for p in prompts])
    om = OffloadedModel(model, host_store(model), [6, 6], prefetch=True, record=True)
    caches = om.init_caches(2, tokens.shape[1])
    for start in (0, chunk):                         # the prefill chunks, padding masked
        positions = start + np.arange(chunk)[None, :].repeat(2, 0)
        valid = positions < lengths[:, None]
        step_tokens = np.where(valid, tokens[:, start:start + chunk], 0)
        caches = om.forward(step_tokens, positions, valid, caches)[1]
    for n in range(new - 1):                         # decode: one position per row
        positions = (lengths + n)[:, None]
        step_tokens = np.take_along_axis(tokens, positions, axis=1)
        caches = om.forward(step_tokens, positions, np.ones((2, 1), bool), caches)[1]
    seen = om.trace()
    np.testing.assert_array_equal(seen.need_NLE, trace.need_NLE)
    # predicted chances (x1000, rounded): cached vs full attention, so within one unit
    np.testing.assert_allclose(seen.pred_NLE, trace.pred_NLE, atol=1)
    assert seen.pred_NLE.sum() > 0


def test_prediction_is_the_chance_that_some_token_picks_the_expert(model):
    """pieces.predict against float64: 1 - prod over valid tokens of (1 - min(1, k * p))."""
    from serve.offload import pieces
    block = next(b for b in model.layers if hasattr(b.ffn, "router"))
    gdef, state = pieces.split(block.ffn_norm, block.ffn.router)
    rng = np.random.default_rng(0)
    x_BSD = rng.normal(size=(2, 3, model.cfg.d_model)).astype(np.float32)
    carry_BD = rng.normal(size=(2, model.cfg.d_model)).astype(np.float32)
    positions = np.array([[0, 1, 2], [4, 5, 6]])             # row 0 starts a sequence: no carry
    valid = np.array([[True, True, False], [True, True, True]])
    got = np.asarray(pieces.predict(gdef, state, x_BSD, carry_BD, positions, valid))
    x = x_BSD.astype(np.float64) + np.where(positions[:, :1] == 0, 0.0, carry_BD)[:, None]
    h = np.asarray(block.ffn_norm(jnp.asarray(x, jnp.float32)), np.float64)
    logits = h @ np.asarray(block.ffn.router.kernel[...], np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    q = np.minimum(1.0, model.cfg.moe.top_k * p)[valid]
    np.testing.assert_allclose(got, 1 - np.prod(1 - q, axis=0), rtol=1e-4, atol=1e-5)


def test_carry_sources():
    steps = record.steps_of_batch([3, 1], new_tokens=3, chunk=2)
    np.testing.assert_array_equal(record.carry_sources(steps, (2, 5)),
                                  [[-1, -1, 1, 2, 3], [-1, 0, 1, -1, -1]])


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


def test_expert_bytes_count_what_one_copy_moves(model):
    moe = model.layers[-1].ffn
    c = moe.cfg
    assert expert_bytes(moe) == 3 * c.d_model * c.d_ff * 4                  # float32
    int8 = moejax.quantize_experts(nnx.clone(model)).layers[-1].ffn
    assert expert_bytes(int8) == 3 * c.d_model * c.d_ff + (2 * c.d_ff + c.d_model) * 4   # + scales


def test_offload_config_errors_name_the_field(tmp_path):
    for kwargs, field in [(dict(slots_per_layer=0), "slots_per_layer"),
                          (dict(slots_per_layer=2.0), "slots_per_layer"),
                          (dict(slots_per_layer=True), "slots_per_layer"),
                          (dict(policy="fifo"), "policy"),
                          (dict(policy=["lru"]), "policy"),
                          (dict(store="gpu"), "store"),
                          (dict(policy="static"), "trace"),
                          (dict(budgets="trace"), "trace"),
                          (dict(trace=str(tmp_path / "none.npz")), "trace"),
                          (dict(store="disk", path=str(tmp_path / "nowhere")), "path"),
                          (dict(prefetch="yes"), "prefetch"),
                          (dict(lfru_decay="0.5"), "lfru_decay"),
                          (dict(policy="lru", trace=123), "trace")]:
        with pytest.raises(OffloadConfigError, match=f"OffloadConfig.{field}"):
            OffloadConfig(**kwargs)
    with pytest.raises(OffloadConfigError, match="slots_per_layer.*only 6 experts"):
        OffloadConfig(slots_per_layer=7).resolve(2, 6)
    # a numpy integer (e.g. read from an array of settings) is an int, kept as a Python one
    assert type(OffloadConfig(slots_per_layer=np.int64(4)).slots_per_layer) is int


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


def test_trace_sim_bad_input_is_one_error_line(micro_serving, tmp_path, capsys):
    from serve import cli
    from tests.serve.test_serve_cli_errors import assert_one_line_error
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "dict.json").write_text('{"a": "b"}')
    out = tmp_path / "out"
    for extra, needles in ((["--prompts", str(tmp_path / "bad.json")], ["bad.json", "not valid JSON"]),
                           (["--prompts", str(tmp_path / "dict.json")], ["dict.json", "list"]),
                           (["--max-new-tokens", "60"], ["--max-new-tokens", "context of 64"])):
        code = cli.main(["trace-sim", "--model", str(micro_serving), "--out", str(out), *extra])
        assert_one_line_error(code, capsys.readouterr().err, *needles)
        assert not out.exists()


def test_trace_sim_reads_a_scanned_model_directory(model, tmp_path):
    """python -m train writes scanned layers; trace-sim walks model.layers: it unrolls them."""
    from moejax import checkpoint as mckpt
    from moejax.layer_stack import stack_layers
    from moejax.model import Transformer
    from serve.offload.tracesim_cli import load_model
    cfg = model.cfg.replace(scan_layers=True)           # the fixture's weights, stacked
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, stack_layers(nnx.to_pure_dict(nnx.state(model)), cfg))
    mckpt.save_model(tmp_path / "run", nnx.merge(graphdef, state), cfg)
    unrolled, encode = load_model(tmp_path / "run")
    assert encode("ab") == [97, 98] and unrolled.cfg == model.cfg
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(unrolled)),
                 nnx.to_pure_dict(nnx.state(model)))
