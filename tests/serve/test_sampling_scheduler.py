"""Sampling filters against numpy, the key rule, the text stream, and the scheduler's plans."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from serve.sampling import RequestError, SamplingParams, sample, split_seed
from serve.scheduler import QueueFull, Request, Scheduler, buckets_for
from serve.tokenizer import ByteTokenizer, TextStream

LOGITS = np.log(np.array([0.4, 0.3, 0.15, 0.1, 0.05], np.float32))


def draws(n, temperature=1.0, top_p=1.0, top_k=0, seed=3, logits=LOGITS):
    logits = jnp.broadcast_to(jnp.asarray(logits), (n, 5))
    seed_B2 = jnp.broadcast_to(jnp.asarray(split_seed(seed), jnp.uint32), (n, 2))
    return np.asarray(jax.jit(sample)(logits, jnp.full((n,), temperature), jnp.full((n,), top_p),
                                      jnp.full((n,), top_k, jnp.int32), seed_B2, jnp.arange(n)))


def test_sampling_follows_the_filtered_softmax():
    n = 4000
    freq = np.bincount(draws(n), minlength=5) / n
    np.testing.assert_allclose(freq, np.exp(LOGITS), atol=0.03)
    top2 = np.bincount(draws(n, top_k=2), minlength=5) / n
    np.testing.assert_allclose(top2, [0.4 / 0.7, 0.3 / 0.7, 0, 0, 0], atol=0.03)
    # top_p=0.6: the smallest prefix with mass >= 0.6 is {0, 1}
    np.testing.assert_allclose(np.bincount(draws(n, top_p=0.6), minlength=5) / n, top2, atol=0.03)
    assert set(draws(200, top_k=1)) == {0} and set(draws(200, top_p=0.01)) == {0}
    assert set(draws(200, temperature=0.0)) == {0}


def filtered_probs(logits, top_k, top_p):
    """numpy reference of the filter order Hugging Face and vLLM use: top-k, renormalise,
    then the smallest prefix of that distribution whose mass reaches top_p."""
    order = np.argsort(-logits, kind="stable")
    probs = np.exp(logits[order] - logits.max())
    probs[top_k:] = 0.0
    probs /= probs.sum()
    keep = (np.cumsum(probs) - probs) < top_p
    probs = np.where(keep, probs, 0.0)
    out = np.zeros_like(probs)
    out[order] = probs / probs.sum()
    return out


def test_top_p_measures_the_mass_of_the_top_k_survivors():
    # top-2 leaves {0.4, 0.3} -> {0.57, 0.43}: top_p=0.5 keeps token 0 alone (over the whole
    # vocabulary its mass 0.4 falls short of 0.5 and token 1 would stay too)
    n = 2000
    for top_k, top_p in ((2, 0.5), (3, 0.8)):
        freq = np.bincount(draws(n, top_k=top_k, top_p=top_p), minlength=5) / n
        np.testing.assert_allclose(freq, filtered_probs(LOGITS, top_k, top_p), atol=0.03)


def test_top_p_that_underflows_float32_keeps_the_top_token():
    # 1e-46 is a valid top_p (> 0) but 0 in float32: the smallest prefix is still the top token
    for logits in (LOGITS, LOGITS[::-1]):
        assert set(draws(200, top_p=1e-46, logits=logits)) == {int(np.argmax(logits))}


def test_key_depends_only_on_seed_and_token_index():
    a = draws(64, seed=5)
    assert (draws(64, seed=5) == a).all()
    assert (draws(64, seed=6) != a).any()
    big = draws(64, seed=2 ** 40 + 5)         # the high word of the seed counts too
    assert (big != a).any()


@pytest.mark.parametrize("field,value", [("max_new_tokens", 0), ("temperature", -0.1), ("top_p", 0.0),
                                         ("top_p", 1.5), ("top_k", -1), ("seed", -1), ("stop", [""]),
                                         ("max_new_tokens", 2.5), ("temperature", "1"),
                                         ("top_k", 2 ** 31)])   # past int32: the step's top_k_B
def test_bad_sampling_params_name_the_field(field, value):
    with pytest.raises(RequestError, match=field):
        SamplingParams(**{field: value})


# (text, stop): a stop string after multi-byte characters, and one that ends in a
# multi-byte character (its first characters must not leak while "€" is half decoded)
@pytest.mark.parametrize("text,stop", [("héllo wörld, stop here", "stop"), ("xyz, a€ and on", "a€")])
def test_text_stream_deltas_join_to_the_final_text(text, stop):
    tok = ByteTokenizer()
    data = list(text.encode())
    stream, sent = TextStream(tok, stop=(stop,)), ""
    for n in range(1, len(data) + 1):
        if stop in tok.decode(data[:n]):   # where the engine ends the request
            break
        sent += stream.push(data[:n])
        assert "\ufffd" not in sent            # never half a character
    final = tok.decode(data)[:tok.decode(data).find(stop)]
    assert final.startswith(sent) and len(sent) >= len(final) - (len(stop) - 1)
    assert sent + stream.finish(final) == final


def _req(n, max_new=3):
    return Request(list(range(1, n + 1)), SamplingParams(max_new_tokens=max_new))


def test_scheduler_chunks_prefill_beside_decoding_rows():
    sched = Scheduler(num_slots=2, max_chunk=4, max_waiting=8)
    assert sched.buckets == (1, 4)
    a, b, c = sched.submit(_req(2)), sched.submit(_req(10)), sched.submit(_req(1))
    plan = sched.plan()
    assert plan.rows == (a, b) and plan.reset_B.tolist() == [True, True]
    assert plan.lengths_B.tolist() == [2, 4] and plan.tokens_BS[1].tolist() == [1, 2, 3, 4]
    sched.commit(plan, np.array([50, 60]))
    assert a.generated == [50] and b.generated == [] and b.fed == 4
    plan = sched.plan()                       # a decodes while b's prompt continues
    assert plan.lengths_B.tolist() == [1, 4] and plan.tokens_BS[0, 0] == 50 and not plan.reset_B.any()
    assert plan.index_B.tolist() == [1, 0]
    sched.commit(plan, np.array([51, 61]))
    sched.release(a)                          # a leaves; c takes its slot at the next plan
    plan = sched.plan()
    assert plan.rows == (c, b) and plan.reset_B.tolist() == [True, False]
    assert plan.lengths_B.tolist() == [1, 2] and plan.seq_len == 4
    sched.commit(plan, np.array([70, 62]))
    assert b.generated == [62] and c.generated == [70]
    plan = sched.plan()
    assert plan.seq_len == 1 and plan.lengths_B.tolist() == [1, 1]


def test_scheduler_queue_limit():
    sched = Scheduler(num_slots=1, max_chunk=4, max_waiting=2)
    sched.submit(_req(1))
    sched.submit(_req(1))
    with pytest.raises(QueueFull):
        sched.submit(_req(1))
    assert buckets_for(64) == (1, 16, 64)


@pytest.mark.parametrize("field,value", [("num_slots", 0), ("num_slots", 2.5), ("max_chunk", 0),
                                         ("max_waiting", 0)])   # 0: every submit refused, generate hung
def test_bad_scheduler_sizes_name_the_argument(field, value):
    sizes = dict(num_slots=2, max_chunk=4, max_waiting=8)
    with pytest.raises(ValueError, match=f"{field} must be an integer >= 1"):
        Scheduler(**{**sizes, field: value})


def test_numpy_scalars_are_numbers():
    got = SamplingParams(max_new_tokens=np.int64(3), temperature=np.float32(0.5), top_p=np.float64(0.9),
                         top_k=np.int32(5), seed=np.uint32(7))
    assert got == SamplingParams(max_new_tokens=3, temperature=0.5, top_p=0.9, top_k=5, seed=7)
    assert [type(getattr(got, f)) for f in ("max_new_tokens", "temperature", "top_k", "seed")] == \
        [int, float, int, int]
    with pytest.raises(RequestError, match="top_k"):
        SamplingParams(top_k=np.bool_(True))
