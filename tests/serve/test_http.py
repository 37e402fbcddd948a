"""The HTTP server as users meet it: a real ``python -m serve http`` process on 127.0.0.1.

Bad requests -> 4xx JSON errors naming the problem; concurrent requests get their solo
results; a stream reassembles to the non-streamed text; a full queue -> 429, not a hang;
SIGTERM finishes in-flight requests, refuses new ones and exits 0.
"""

from __future__ import annotations

import http.client
import json
import re
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from serve.http import parse_completion
from tests.serve import asgi_client
from tests.xla_flags import xla_flags

REPO = Path(__file__).resolve().parents[2]
MAX_BODY = 4096


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# the micro model's tokenizer (bytes) ships no chat template: the server gets one
CHAT_TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>"


class Server:
    def __init__(self, model_dir: Path, work_dir: Path):
        self.port = free_port()
        (work_dir / "chat.jinja").write_text(CHAT_TEMPLATE)
        env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "serve", "http", "--model", str(model_dir), "--port", str(self.port),
             "--slots", "4", "--max-queue", "4", "--chunk", "16", "--max-body", str(MAX_BODY), "--name", "micro",
             "--chat-template", str(work_dir / "chat.jinja")],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: {self.proc.stderr.read()}")
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.3)
        raise AssertionError("server did not come up")

    def request(self, method, path, body=None, raw: bytes | None = None, timeout=120):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        text = response.read().decode()
        conn.close()
        return response.status, text

    def get(self, path):
        return self.request("GET", path, timeout=5)

    def complete(self, body, **kw):
        status, text = self.request("POST", "/v1/completions", body, **kw)
        return status, (json.loads(text) if text.startswith("{") else text)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


_LIVE: dict = {}


@pytest.fixture
def server(micro_serving, tmp_path_factory):
    """A running server (started once; started again if a test stopped it)."""
    if "server" not in _LIVE or _LIVE["server"].proc.poll() is not None:
        work_dir = _LIVE.setdefault("work_dir", tmp_path_factory.mktemp("server"))
        _LIVE["server"] = Server(micro_serving, work_dir)
    yield _LIVE["server"]


@pytest.fixture(scope="module", autouse=True)
def _stop_server_at_end():
    yield
    if "server" in _LIVE:
        _LIVE.pop("server").stop()


BAD = {
    "not JSON": (b"{prompt: 1", 400, "not valid JSON"),
    "JSON nested too deep": (b"[" * 4000, 400, "not valid JSON"),   # past the recursion limit (3000 here)
    "not an object": ([1, 2], 400, "JSON object"),
    "missing prompt": ({"max_tokens": 3}, 400, "prompt: missing"),
    "prompt of wrong type": ({"prompt": 5}, 400, "prompt: must be"),
    "mixed prompt list": ({"prompt": ["a", 3]}, 400, "prompt: must be"),
    "max_tokens a string": ({"prompt": "a", "max_tokens": "3"}, 400, "max_tokens: must be an integer"),
    "max_tokens zero": ({"prompt": "a", "max_tokens": 0}, 400, "max_tokens: must be an integer >= 1"),
    "temperature negative": ({"prompt": "a", "temperature": -1}, 400, "temperature"),
    "top_p above one": ({"prompt": "a", "top_p": 1.5}, 400, "top_p"),
    "stream not bool": ({"prompt": "a", "stream": "yes"}, 400, "stream: must be true or false"),
    "stop of wrong type": ({"prompt": "a", "stop": 5}, 400, "stop"),
    "seed negative": ({"prompt": "a", "seed": -3}, 400, "seed"),
    "stream_options without stream": ({"prompt": "a", "stream_options": {"include_usage": True}}, 400,
                                      "stream_options: only allowed with stream: true"),
    "include_usage not bool": ({"prompt": "a", "stream": True, "stream_options": {"include_usage": 1}},
                               400, "stream_options.include_usage: must be true or false"),
    "prompt with a lone surrogate": (b'{"prompt": ["ok", "ab\\ud800c"]}', 400, "prompt: holds a lone surrogate"),
    "token id out of vocabulary": ({"prompt": [1, 2, 300]}, 400, "outside the vocabulary"),
    "over the context": ({"prompt": "x" * 60, "max_tokens": 10}, 400, "context limit of 64"),
    "n > 1": ({"prompt": "a", "n": 2}, 400, "n: only 1"),
    "n true": ({"prompt": "a", "n": True}, 400, "n: only 1"),
    "a penalty (not implemented)": ({"prompt": "a", "frequency_penalty": 0.5}, 400, "frequency_penalty: only 0"),
    "more prompts than the queue holds": ({"prompt": ["a"] * 5}, 400, "queues at most 4"),
    "other model": ({"prompt": "a", "model": "gpt-9"}, 404, "not served here"),
    "body too large": ({"prompt": "x" * (MAX_BODY + 10)}, 413, "limit of 4096"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_requests_get_4xx_naming_the_problem(server, case):
    body, status, needle = BAD[case]
    raw = body if isinstance(body, bytes) else None
    got, reply = server.complete(None if raw else body, raw=raw)
    assert got == status, (got, reply)
    assert needle in reply["error"]["message"], reply
    assert server.get("/health")[0] == 200            # and the server stays up


def test_wrong_routes_and_methods(server):
    status, text = server.get("/v1/nothing")
    assert status == 404 and "error" in json.loads(text)
    status, text = server.get("/v1/completions")
    assert status == 405 and "error" in json.loads(text)


PROMPTS = ["def main(", "import os\n", "x = [", "class A:"]


def test_concurrent_requests_get_their_solo_results(server):
    solo = [server.complete({"prompt": p, "max_tokens": 8, "temperature": 0})[1] for p in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(lambda p: server.complete({"prompt": p, "max_tokens": 8, "temperature": 0}),
                                 PROMPTS))
    for (status, reply), alone in zip(together, solo):
        assert status == 200, reply
        assert reply["choices"][0]["text"] == alone["choices"][0]["text"]
        assert reply["usage"]["completion_tokens"] == 8 and reply["choices"][0]["finish_reason"] == "length"
    status, both = server.complete({"prompt": PROMPTS[:2], "max_tokens": 8, "temperature": 0})
    assert [c["text"] for c in both["choices"]] == [s["choices"][0]["text"] for s in solo[:2]]


def test_each_prompt_draws_its_own_seed_unless_one_is_given():
    body = {"prompt": ["ab", "ab"], "temperature": 1.0, "presence_penalty": 0, "frequency_penalty": 0.0,
            "logit_bias": {}}                  # neutral values of fields not implemented: accepted
    _, params, _ = parse_completion(body, "micro")
    assert params[0].seed != params[1].seed    # a prompt sent twice gives two samples
    _, params, _ = parse_completion({**body, "seed": 7}, "micro")
    assert [p.seed for p in params] == [7, 7]  # a seed: the same prompt, the same tokens


def _post(app, body: dict) -> tuple[int, dict]:
    status, data = asgi_client.post(app, "/v1/completions", body)
    return status, json.loads(data)


def test_a_failed_step_is_a_500_not_a_200_with_part_of_the_text(micro_model):
    from serve import Engine
    from serve.http import create_app
    from serve.tokenizer import ByteTokenizer
    engine = Engine(micro_model[0], ByteTokenizer(), num_slots=2, max_len=8, max_chunk=4)

    def broken_step(*_args):
        raise RuntimeError("device lost")

    engine._step_fn = broken_step
    engine.start()
    try:
        status, reply = _post(create_app(engine, model_name="micro"), {"prompt": [1, 2], "max_tokens": 2})
    finally:
        engine.stop()
    assert status == 500 and "generation failed" in reply["error"]["message"], reply


def test_seeded_sampling_repeats(server):
    body = {"prompt": "abc", "max_tokens": 8, "temperature": 0.9, "top_p": 0.95, "seed": 1234}
    assert server.complete(body)[1]["choices"][0]["text"] == server.complete(body)[1]["choices"][0]["text"]


def test_stream_reassembles_to_the_plain_text(server):
    body = {"prompt": "def main(", "max_tokens": 12, "temperature": 0}
    plain = server.complete(body)[1]["choices"][0]
    status, text = server.request("POST", "/v1/completions", {**body, "stream": True})
    assert status == 200
    events = [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_chat_with_the_template_given_on_the_command_line(server):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "def f("}]
    status, reply = server.request("POST", "/v1/chat/completions",
                                   {"messages": messages, "max_tokens": 8, "temperature": 0})
    assert status == 200, reply
    rendered = "<system>be brief\n<user>def f(\n<assistant>"
    plain = server.complete({"prompt": rendered, "max_tokens": 8, "temperature": 0})[1]
    assert json.loads(reply)["choices"][0]["message"]["content"] == plain["choices"][0]["text"]


def test_models_health_metrics(server):
    status, text = server.get("/v1/models")
    assert status == 200 and json.loads(text)["data"][0]["id"] == "micro"
    status, text = server.get("/metrics")
    assert status == 200
    for name in ("moejax_requests_submitted_total", "moejax_tokens_per_second", "moejax_queue_length",
                 "moejax_batch_occupancy", "moejax_http_responses_total"):
        assert f"\n{name}" in text, name


def test_full_queue_gets_429_not_a_hang(server):
    body = {"prompt": "q", "max_tokens": 40, "temperature": 0}
    with ThreadPoolExecutor(16) as pool:                 # 4 slots + 4 queued < 16
        replies = list(pool.map(lambda _: server.complete(body, timeout=300), range(16)))
    statuses = sorted(s for s, _ in replies)
    assert set(statuses) <= {200, 429} and 429 in statuses and 200 in statuses, statuses
    busy = next(r for s, r in replies if s == 429)
    assert "busy" in busy["error"]["message"]
    assert server.get("/health")[0] == 200


def _submitted(server) -> int:
    text = server.get("/metrics")[1]
    return int(float(re.search(r"^moejax_requests_submitted_total (\S+)$", text, re.M).group(1)))


def test_sigterm_finishes_in_flight_requests_then_exits(server):
    results = []
    body = {"prompt": "drain", "max_tokens": 40, "temperature": 0}
    threads = [threading.Thread(target=lambda: results.append(server.complete(body, timeout=300)))
               for _ in range(2)]
    before = _submitted(server)
    for t in threads:
        t.start()
    # SIGTERM once both are accepted (usually mid-generation). Polling /health for active > 0
    # raced: a micro-model request can finish between two polls, and then it never showed.
    deadline = time.monotonic() + 60
    while _submitted(server) < before + 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    server.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(300)
    assert server.proc.wait(120) == 0
    assert "server stopped after draining" in server.proc.stderr.read()
    assert [s for s, _ in results] == [200, 200], results
    assert all(r["usage"]["completion_tokens"] == 40 for _, r in results)
    with pytest.raises(OSError):
        server.get("/health")
