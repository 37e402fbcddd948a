"""/v1/chat/completions: the chat template renders as transformers renders it; the reply is
what the engine generates from that prompt; the stream joins to it; bad messages are 400s."""

from __future__ import annotations

import json

import pytest

from serve import Engine
from serve.chat import ChatTemplate, parse_messages
from serve.sampling import RequestError
from serve.tokenizer import HFTokenizer
from tests.serve import asgi_client

# Block tags on their own lines (trim_blocks / lstrip_blocks decide the whitespace), the
# special tokens, loop controls, tojson and raise_exception: what real templates use.
TEMPLATE = """{{ bos_token }}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unsupported role ' + message['role']) }}
    {% endif %}
    {% if loop.first and message['role'] == 'assistant' %}
        {{ raise_exception('the conversation must not start with the assistant') }}
    {% endif %}
    {% if message['content'] == 'skip' %}{% continue %}{% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] | trim }}{% if message.name is defined %} {{ message.name | tojson }}{% endif %}
<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""
SPECIAL = ["[BOS]", "[EOS]", "<|im_start|>", "<|im_end|>"]
WORDS = ["hello", "world", "you", "are", "a", "bot", "user", "assistant", "system", "!", "hi", "ok", '"',
         "bob", "skip"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, processors
    vocab = {"[UNK]": 0, **{t: i + 1 for i, t in enumerate(SPECIAL + WORDS)}}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIAL)
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 1)])
    path = tmp_path_factory.mktemp("chat_tokenizer")
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": TEMPLATE,
        "bos_token": {"__type": "AddedToken", "content": "[BOS]", "special": True}, "eos_token": "[EOS]"}))
    return path


MESSAGES = [{"role": "system", "content": "you are a bot "},
            {"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "world"}],
             "name": "bob"},
            {"role": "user", "content": "skip"},
            {"role": "assistant", "content": "hi"},
            {"role": "user", "content": "ok !"}]


def test_template_renders_and_encodes_as_transformers(tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    template = ChatTemplate.from_tokenizer_dir(tokenizer_dir)
    assert template.special_tokens == {"bos_token": "[BOS]", "eos_token": "[EOS]"}
    messages = parse_messages(MESSAGES)      # text parts joined, as the reference gets them here
    want = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert template.render(messages) == want
    ours = HFTokenizer(tokenizer_dir / "tokenizer.json").encode(want, special_tokens=False)
    assert ours == reference(want, add_special_tokens=False)["input_ids"]
    assert ours[0] == 1 and ours.count(1) == 1           # the template's BOS, not a second one
    with pytest.raises(RequestError, match="must not start with the assistant"):
        template.render([{"role": "assistant", "content": "hi"}])


# what transformers' environment has beyond plain Jinja: tools / documents passed as None (a
# Mistral-style `tools is not none` is false), the {% generation %} block of assistant masks
REFERENCE_TEMPLATES = [
    "{{ bos_token }}{% for m in messages %}{% if tools is not none and loop.last %}[TOOLS]"
    "{{ tools | tojson }}{% endif %}[INST] {{ m['content'] }} [/INST]{% endfor %}",
    "{% if documents is not none %}[DOCS]{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}",
    "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{{ eos_token }}"
    "{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}",
]


@pytest.mark.parametrize("source", REFERENCE_TEMPLATES, ids=["tools-none", "documents-none", "generation-tag"])
def test_template_features_render_as_transformers(tokenizer_dir, tmp_path, source):
    transformers = pytest.importorskip("transformers")
    (tmp_path / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": source}))
    messages = parse_messages(MESSAGES)
    want = transformers.AutoTokenizer.from_pretrained(str(tmp_path)).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False)
    assert ChatTemplate.from_tokenizer_dir(tmp_path).render(messages) == want


def test_a_template_failing_on_the_data_is_a_request_error():
    with pytest.raises(RequestError, match="^messages: .*TypeError"):
        ChatTemplate("{{ messages[0]['content'] + 1 }}").render(parse_messages(MESSAGES[:1]))


@pytest.mark.parametrize("messages, field", [
    ([], "messages"),
    ("hello", "messages"),
    ([{"content": "hi"}], r"messages\[0\].role"),
    ([{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}], r"messages\[1\].role"),
    ([{"role": "user", "content": None}], r"messages\[0\].content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], r"messages\[0\].content"),
    ([{"role": "user", "content": "a\ud800"}], r"messages\[0\].content: holds a lone surrogate"),
])
def test_bad_messages_name_the_field(messages, field):
    with pytest.raises(RequestError, match=f"^{field}"):
        parse_messages(messages)


@pytest.fixture(scope="module")
def chat_engine(micro_model, tokenizer_dir):
    template = ChatTemplate.from_tokenizer_dir(tokenizer_dir)
    engine = Engine(micro_model[0], HFTokenizer(tokenizer_dir / "tokenizer.json", None, template),
                    num_slots=2, max_len=64, max_chunk=16)
    # the reference: the engine's greedy reply to the rendered prompt, before it serves
    prompt = engine.tokenizer.encode(template.render(parse_messages(MESSAGES[:2])), special_tokens=False)
    solo = engine.generate([prompt], max_new_tokens=6, temperature=0.0)[0]
    engine.start()
    yield engine, prompt, solo
    engine.stop()


def test_chat_reply_is_the_engine_greedy_reply_and_the_stream_joins_to_it(chat_engine):
    from serve.http import create_app
    engine, prompt, solo = chat_engine
    app = create_app(engine, model_name="micro")
    body = {"messages": MESSAGES[:2], "max_tokens": 6, "temperature": 0}
    status, data = asgi_client.post(app, "/v1/chat/completions", body)
    reply = json.loads(data)
    assert status == 200 and reply["object"] == "chat.completion", reply
    message = reply["choices"][0]["message"]
    assert message == {"role": "assistant", "content": solo.text}
    assert reply["usage"]["prompt_tokens"] == len(prompt)
    status, data = asgi_client.post(app, "/v1/chat/completions", {**body, "stream": True})
    chunks = asgi_client.events(data)
    assert status == 200 and chunks[-1] == "[DONE]"
    deltas = [c["choices"][0]["delta"] for c in chunks[:-1]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert "".join(d.get("content", "") for d in deltas) == solo.text
    assert chunks[-2]["choices"][0]["finish_reason"] == reply["choices"][0]["finish_reason"]
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks[:-1])


def test_stream_usage_only_when_asked_in_a_last_chunk_without_choices(chat_engine):
    """OpenAI's stream_options.include_usage: every chunk has usage null, then one more chunk
    with choices [] carries the usage of the whole request (the one a plain reply reports)."""
    from serve.http import create_app
    app = create_app(chat_engine[0], model_name="micro")
    body = {"messages": MESSAGES[:2], "max_tokens": 5, "temperature": 0}
    plain = json.loads(asgi_client.post(app, "/v1/chat/completions", body)[1])
    status, data = asgi_client.post(app, "/v1/chat/completions",
                                    {**body, "stream": True, "stream_options": {"include_usage": True}})
    chunks = asgi_client.events(data)
    assert status == 200 and chunks[-1] == "[DONE]"
    *replies, last = chunks[:-1]
    assert last["choices"] == [] and last["usage"] == plain["usage"]
    assert all(c["usage"] is None and len(c["choices"]) == 1 for c in replies)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in replies) == \
        plain["choices"][0]["message"]["content"]


def test_chat_errors_are_400s_naming_the_field(chat_engine, micro_model):
    from serve.http import create_app
    from serve.tokenizer import ByteTokenizer
    app = create_app(chat_engine[0], model_name="micro")
    for body, field in [({"messages": [{"role": "assistant", "content": "hi"}]}, "messages"),
                        ({"messages": [{"role": "user"}]}, "messages[0].content"),
                        ({"messages": MESSAGES, "tools": [{"type": "function"}]}, "tools"),
                        ({"messages": MESSAGES, "max_completion_tokens": 0}, "max_completion_tokens"),
                        ({"messages": MESSAGES, "max_tokens": 60}, "max_tokens"),
                        ({"messages": MESSAGES, "max_completion_tokens": 60, "max_tokens": 1},
                         "max_completion_tokens"),
                        # a conversation that fills the context: no reply fits, whatever the limit
                        ({"messages": [{"role": "user", "content": "hello " * 70}]}, "messages")]:
        status, data = asgi_client.post(app, "/v1/chat/completions", body)
        assert status == 400 and json.loads(data)["error"]["param"] == field, (body, data)
    # a model whose tokenizer ships no template: a 400 that says what to do
    bytes_engine = Engine(micro_model[0], ByteTokenizer(), num_slots=1, max_len=16, max_chunk=4)
    status, data = asgi_client.post(create_app(bytes_engine, model_name="micro"), "/v1/chat/completions",
                                    {"messages": MESSAGES[:1]})
    assert status == 400 and "--chat-template" in json.loads(data)["error"]["message"]
