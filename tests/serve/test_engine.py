"""The engine against the full forward: greedy tokens, batches, staggered arrivals, seeds.

Reference: step-by-step argmax of the plain full forward ``model(tokens)``,
one jitted call on a fixed padded length (causal attention: positions after
the real tokens cannot change the logits read at the last real one).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moejax
from serve import Engine, SamplingParams
from serve.tokenizer import ByteTokenizer
from tests.serve.conftest import micro_config

PAD_LEN = 48


_FORWARDS: dict = {}


def reference_greedy(model, prompt: list[int], steps: int) -> list[int]:
    if id(model) not in _FORWARDS:         # one compile per model
        graphdef, state = nnx.split(model)
        _FORWARDS[id(model)] = (model, state, jax.jit(lambda st, t: nnx.merge(graphdef, st)(t)[0]))
    _, state, forward = _FORWARDS[id(model)]
    tokens, out = list(prompt), []
    for _ in range(steps):
        padded = np.zeros((1, PAD_LEN), np.int32)
        padded[0, :len(tokens)] = tokens
        logits = np.asarray(forward(state, jnp.asarray(padded)))[0, len(tokens) - 1]
        out.append(int(np.argmax(logits)))
        tokens.append(out[-1])
    return out


PROMPTS = [[5], [7, 200, 3, 9, 81], list(range(30, 43)), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16,
                                                             17, 18, 19, 20]]


@pytest.fixture(scope="module")
def micro_engine(micro_model):
    model, _ = micro_model
    # 2 slots for 4 prompts: requests queue; chunk 8: the longer prompts prefill in chunks.
    # warmup(): every step shape compiled here (side by side), none in the tests
    engine = Engine(model, ByteTokenizer(), num_slots=2, max_len=PAD_LEN, max_chunk=8)
    engine.warmup()
    return engine


@pytest.mark.parametrize("preset", moejax.ModelConfig.preset_names())
def test_greedy_equals_full_forward_every_preset(preset):
    base = moejax.ModelConfig.preset(preset)
    # one layer of each kind the preset has (deepseek: a dense layer, then an MoE one)
    n = len(dict.fromkeys(base.ffn_kinds))
    cfg = base.replace(n_layers=n, ffn_kinds=base.ffn_kinds[:n], max_seq_len=PAD_LEN)
    model = moejax.Transformer(cfg, rngs=nnx.Rngs(1))
    # prefill in chunks of 8 for latent attention (its own cache path); the GQA variants feed
    # prompts one token per step here (one compile) -- their chunked prefill is tested below
    engine = Engine(model, ByteTokenizer(), num_slots=2, max_len=PAD_LEN, max_chunk=8 if cfg.mla else 1)
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], [2, 7]]        # 11 tokens: two prefill chunks
    outs = engine.generate(prompts, max_new_tokens=4)
    for prompt, out in zip(prompts, outs):
        assert out.tokens == reference_greedy(model, prompt, 4), preset
        assert out.finish_reason == "length"


def test_batch_gives_each_prompt_its_solo_result(micro_model, micro_engine, caplog):
    model, _ = micro_model
    with jax.log_compiles(True), caplog.at_level("WARNING"):     # warmup() compiled every shape
        batched = micro_engine.generate(PROMPTS, max_new_tokens=6)
    assert [r.message for r in caplog.records if "Compiling" in r.message] == []
    for prompt, out in zip(PROMPTS, batched):
        solo = micro_engine.generate([prompt], max_new_tokens=6)[0]
        assert out.tokens == solo.tokens
        assert out.tokens == reference_greedy(model, prompt, 6)


def test_staggered_arrivals_get_their_solo_tokens(micro_engine):
    solo = [micro_engine.generate([p], max_new_tokens=5)[0].tokens for p in PROMPTS]
    params = SamplingParams(max_new_tokens=5)
    requests = [micro_engine.make_request(p, params) for p in PROMPTS]
    micro_engine.submit(requests[0])
    for i, request in enumerate(requests[1:], start=1):
        for _ in range(i):                 # the batch is mid-flight when the next one arrives
            micro_engine.step()
        micro_engine.submit(request)
    while not all(r.done for r in requests):
        micro_engine.step()
    assert [r.generated for r in requests] == solo


def test_seeded_sampling_is_batch_independent(micro_engine):
    kwargs = dict(max_new_tokens=6, temperature=1.0, top_p=0.9, top_k=40)
    solo = [micro_engine.generate([p], seed=11, **kwargs)[0].tokens for p in PROMPTS[:3]]
    batched = [o.tokens for o in micro_engine.generate(PROMPTS[:3], seed=11, **kwargs)]
    assert batched == solo
    other_seed = micro_engine.generate([PROMPTS[1]], seed=12, **kwargs)[0].tokens
    greedy = micro_engine.generate([PROMPTS[1]], max_new_tokens=6)[0].tokens
    assert other_seed != solo[1] or greedy != solo[1]   # it really samples


def test_stop_string_cuts_the_text(micro_engine):
    full = micro_engine.generate(["ab"], max_new_tokens=16)[0]
    ascii_at = [k for k, t in enumerate(full.tokens) if 32 <= t < 127]
    assert ascii_at, "no printable ASCII token to stop at"
    k = ascii_at[0]
    out = micro_engine.generate(["ab"], max_new_tokens=16, stop=[chr(full.tokens[k]), "never"])[0]
    assert out.finish_reason == "stop"
    assert out.tokens == full.tokens[:k + 1]
    assert out.text == ByteTokenizer().decode(full.tokens[:k])


def test_eos_ends_a_request(micro_engine):
    first = micro_engine.generate([[5]], max_new_tokens=4)[0]
    # any of several end ids ends it (chat models: end of text and end of turn)
    micro_engine.tokenizer.eos_token_ids = (next(t for t in range(256) if t not in first.tokens), first.tokens[2])
    try:
        out = micro_engine.generate([[5]], max_new_tokens=4)[0]
    finally:
        del micro_engine.tokenizer.eos_token_ids      # back to the class's ()
    stop_at = first.tokens.index(first.tokens[2])
    assert out.finish_reason == "stop" and out.tokens == first.tokens[:stop_at]


def test_a_token_dropping_moe_is_announced(caplog):
    """capacity_factor: padding and batch neighbours take capacity, so a request's greedy tokens
    depend on them (measured: 2 of 4 prompts changed between solo and batched)."""
    from serve.engine import _notice_token_dropping    # what Engine() calls first (a model costs 2 s)
    base = micro_config()
    with caplog.at_level("WARNING", logger="serve.engine"):
        _notice_token_dropping(base)
        assert caplog.text == ""
        _notice_token_dropping(base.replace(moe=dataclasses.replace(base.moe, capacity_factor=1.0)))
    assert "capacity_factor=1.0 drops tokens" in caplog.text


def test_requests_over_the_context_are_refused(micro_engine):
    from serve import RequestError
    with pytest.raises(RequestError, match="context limit of 48"):
        micro_engine.generate([[1] * 40], max_new_tokens=9)
    with pytest.raises(RequestError, match="outside the vocabulary"):
        micro_engine.generate([[1, 256]], max_new_tokens=2)
    with pytest.raises(RequestError, match="empty"):
        micro_engine.generate([""], max_new_tokens=2)


def test_a_failed_step_notifies_the_waiting_requests(micro_model):
    """The HTTP handlers wait for on_update: a step that raises must still report 'error'."""
    from serve.scheduler import Request
    model, _ = micro_model
    engine = Engine(model, ByteTokenizer(), num_slots=2, max_len=8, max_chunk=4)

    def broken_step(*_args):
        raise RuntimeError("device lost")

    engine._step_fn = broken_step
    seen: list[Request] = []
    request = engine.make_request([1, 2], SamplingParams(max_new_tokens=2), on_update=seen.append)
    engine.start()
    engine.submit(request)
    assert request.finished.wait(30)
    engine.stop()
    assert request.finish_reason == "error"
    assert seen == [request]
    assert engine.stats()["errors"] == 1


def test_prompt_forms_numpy_jax_ids_and_a_lone_string(micro_model, micro_engine):
    from serve import RequestError
    model, _ = micro_model
    ids = [7, 200, 3]
    forms = [np.array(ids), jnp.array(ids, jnp.int32), tuple(ids), [np.int64(t) for t in ids]]
    want = reference_greedy(model, ids, 3)
    assert [o.tokens for o in micro_engine.generate(forms, max_new_tokens=3)] == [want] * len(forms)
    outs = micro_engine.generate("hi!", max_new_tokens=3)          # one prompt, not one per character
    assert len(outs) == 1 and outs[0].tokens == reference_greedy(model, list(b"hi!"), 3)
    for bad in ([1.0, 2.0], [True, 3], None, [[1, 2]], 5):
        with pytest.raises(RequestError, match="prompt: must be text or a sequence of integer token ids"):
            micro_engine.make_request(bad, SamplingParams())


def test_max_len_outside_the_model_context_is_refused(micro_model):
    """max_len past the model's max_seq_len used to be cut silently and 0 meant 'all of it'."""
    from serve.engine import EngineConfigError
    model, _ = micro_model
    top = model.cfg.max_seq_len
    assert Engine(model, ByteTokenizer(), num_slots=1, max_chunk=4).max_len == top
    assert Engine(model, ByteTokenizer(), num_slots=1, max_len=np.int64(top - 1), max_chunk=4).max_len == top - 1
    for bad in (0, -1, top + 1, 2.5, True):
        with pytest.raises(EngineConfigError, match=rf"max_len must be an integer in \[1, {top}\]"):
            Engine(model, ByteTokenizer(), num_slots=1, max_len=bad, max_chunk=4)


def test_a_failed_step_in_generate_leaves_the_engine_clean(micro_model):
    """generate() in the caller's thread: the error reaches the caller, no request stays queued
    or in a slot, and the next call runs on fresh state."""
    model, _ = micro_model
    engine = Engine(model, ByteTokenizer(), num_slots=2, max_len=8, max_chunk=4)

    def broken_step(*_args):
        raise RuntimeError("device lost")

    engine._step_fn = broken_step
    with pytest.raises(RuntimeError, match="device lost"):
        engine.generate([[5], [7, 200, 3], [9]], max_new_tokens=3)
    assert not engine.scheduler.has_work()
    assert engine.generate([[5]], max_new_tokens=3)[0].tokens == reference_greedy(model, [5], 3)


def test_a_raising_on_update_cancels_only_its_own_request(micro_model):
    """A listener that is gone (HTTP: its event loop closed) must not fail the batch or the loop."""
    model, _ = micro_model
    engine = Engine(model, ByteTokenizer(), num_slots=2, max_len=8, max_chunk=4)

    def gone(_request):
        raise RuntimeError("Event loop is closed")

    bad = engine.make_request([5], SamplingParams(max_new_tokens=3), on_update=gone)
    good = engine.make_request([5], SamplingParams(max_new_tokens=3))
    engine.start()
    try:
        engine.submit(bad)
        engine.submit(good)
        assert good.finished.wait(60) and bad.finished.wait(60)
        assert (bad.finish_reason, good.finish_reason) == ("cancelled", "length")
        assert good.generated == reference_greedy(model, [5], 3)
        assert engine.running and engine.generate([[5]], max_new_tokens=3)[0].tokens == good.generated
    finally:
        engine.stop()


def test_row_buckets_step_only_up_to_the_last_busy_slot():
    # Scanned layers (a stacked cache: rows on axis 1) and an Engram layer (its own decode
    # state): a step of B < num_slots rows works on the cache's first B rows. Requests of
    # different lengths arrive and leave, so the step height moves through 1, 4, 2 and 1,
    # and every request still decodes as the full forward does.
    memory = moejax.MemoryConfig(ngram_orders=(2, 3), ngram_heads=2, ngram_table_rows=512, ngram_d_row=8)
    cfg = micro_config(memory=memory, ffn_kinds=("engram+moe", "moe"), scan_layers=True)
    model = moejax.Transformer(cfg, rngs=nnx.Rngs(2))
    engine = Engine(model, ByteTokenizer(), num_slots=4, max_len=PAD_LEN, max_chunk=8)
    heights = []
    engine.step_hooks.append(lambda engine, plan: heights.append(plan.tokens_BS.shape[0]))
    requests = [engine.make_request(p, SamplingParams(max_new_tokens=n)) for p, n in zip(PROMPTS, (14, 7, 3, 2))]
    engine.submit(requests[0])
    for _ in range(2):                  # a lone request: one row
        engine.step()
    for request in requests[1:]:
        engine.submit(request)
    while not all(r.done for r in requests):
        engine.step()
    last_4 = len(heights) - heights[::-1].index(4)
    assert heights[:2] == [1, 1] and 2 in heights[last_4:] and heights[-1] == 1, heights
    assert heights[last_4:] == sorted(heights[last_4:], reverse=True), heights
    for prompt, request in zip(PROMPTS, requests):
        assert request.generated == reference_greedy(model, prompt, len(request.generated))


def test_replace_experts_swaps_the_moe_beside_a_memory():
    # 'engram+moe' holds its MoE at ffn.ffn: the swap must reach it (setting ffn.experts on
    # the wrapper left the float experts computing). Reference: the full forward of the same
    # model with every routed expert quantized.
    memory = moejax.MemoryConfig(ngram_orders=(2,), ngram_heads=2, ngram_table_rows=256, ngram_d_row=8)
    cfg = micro_config(memory=memory, ffn_kinds=("engram+moe", "moe"))
    model, quantized = (moejax.Transformer(cfg, rngs=nnx.Rngs(3)) for _ in range(2))
    moejax.quantize_experts(quantized)
    engine = Engine(model, ByteTokenizer(), num_slots=2, max_len=PAD_LEN, max_chunk=8)
    assert [i for i, _ in engine.moe_layers()] == [0, 1]
    for i, moe in engine.moe_layers():
        engine.replace_experts(i, moejax.experts.Int8Experts.from_float(moe.experts))
    outs = engine.generate(PROMPTS[1:3], max_new_tokens=6)
    assert [o.tokens for o in outs] == [reference_greedy(quantized, p, 6) for p in PROMPTS[1:3]]
    with pytest.raises(ValueError, match="layer 5 is not an MoE layer"):
        engine.replace_experts(5, moe.experts)
