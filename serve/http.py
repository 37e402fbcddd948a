"""``python -m serve http``: an OpenAI-compatible completions server (Starlette + Uvicorn).

    POST /v1/completions   {"prompt": str | [str] | [int] | [[int]], "max_tokens", "temperature",
                            "top_p", "top_k", "seed", "stop", "stream", "stream_options"}
                           (without a seed every prompt draws its own; with one, all use it;
                           stream_options.include_usage adds a last chunk with the usage)
    POST /v1/chat/completions  {"messages": [{"role", "content"}], "max_tokens" |
                            "max_completion_tokens" (default: the rest of the context), and the
                            sampling fields above}: the model's chat template (serve.chat)
                            renders the messages; the reply is the assistant's message
    GET  /v1/models, /health, /metrics (Prometheus text)

The engine runs its loop in one background thread; a handler only checks the
request, queues it and waits (on asyncio) for the engine's updates. Bad
requests get a 4xx JSON error that names the problem; a full queue gets 429;
after SIGTERM no new connections are accepted, in-flight requests finish,
then the engine stops and the process exits.
"""

from __future__ import annotations

import asyncio
import collections
import json
import secrets
import signal
import sys
import time
from pathlib import Path

from serve.chat import parse_messages
from serve.engine import Engine, EngineStopped
from serve.metrics import prometheus_text
from serve.sampling import RequestError, SamplingParams
from serve.scheduler import QueueFull, Request
from serve.tokenizer import TextStream

DEFAULT_MAX_TOKENS = 16          # OpenAI's default
# OpenAI fields this server does not implement: only their neutral value is accepted, since
# ignoring another one would answer a different request than the client asked (no penalty)
UNSUPPORTED = {"n": 1, "best_of": 1, "logprobs": None, "echo": False, "suffix": None,
               "presence_penalty": 0.0, "frequency_penalty": 0.0, "logit_bias": {}}
# chat: tools and structured output are not implemented; logprobs is a boolean there
CHAT_UNSUPPORTED = {**UNSUPPORTED, "logprobs": False, "top_logprobs": None, "tools": None,
                    "tool_choice": None, "functions": None, "function_call": None,
                    "response_format": None}


class HTTPError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def _error_body(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
    from starlette.responses import JSONResponse
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                        status_code=status)


def _is_neutral(value, neutral) -> bool:
    """``value`` is the neutral setting: the exact type (true / 1.0 are not n = 1), except
    that a penalty's 0 may be written 0 or 0.0."""
    if isinstance(neutral, float):
        return type(value) in (int, float) and value == neutral
    return type(value) is type(neutral) and value == neutral


def _field(body: dict, name: str, kinds: tuple, default, what: str):
    value = body.get(name)
    if value is None:                 # absent or null: the default (clients send null for "unset")
        return default
    if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
        raise HTTPError(400, f"{name}: must be {what}, got {json.dumps(value)[:80]}", name)
    return value


def _prompts(body: dict) -> list:
    """The prompt(s) as a list of strings or token-id lists."""
    if "prompt" not in body:
        raise HTTPError(400, "prompt: missing (a string, a list of strings, or token ids)", "prompt")
    prompt = body["prompt"]
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [prompt]
        if all(isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
               for p in prompt):
            return list(prompt)
    raise HTTPError(400, "prompt: must be a string, a non-empty list of strings, a list of token ids "
                         "or a list of such lists", "prompt")


def _check_body(body, model_name: str, unsupported: dict) -> None:
    if not isinstance(body, dict):
        raise HTTPError(400, "the body must be a JSON object")
    if body.get("model") not in (None, model_name):
        raise HTTPError(404, f"model: {body['model']!r} is not served here (this server has {model_name!r})",
                        "model", "not_found_error")
    for name, neutral in unsupported.items():
        value = body.get(name)
        if value is not None and not _is_neutral(value, neutral):
            raise HTTPError(400, f"{name}: only {json.dumps(neutral)} is supported", name)


def parse_completion(body, model_name: str) -> tuple[list, list[SamplingParams], bool]:
    """Validate a /v1/completions body -> (prompts, sampling params of each prompt, stream)."""
    _check_body(body, model_name, UNSUPPORTED)
    prompts = _prompts(body)
    params = _sampling(body, "max_tokens", DEFAULT_MAX_TOKENS, len(prompts))
    return prompts, params, _field(body, "stream", (bool,), False, "true or false")


def stream_usage(body: dict, stream: bool) -> bool:
    """Whether a stream ends with a usage chunk: OpenAI's ``stream_options.include_usage``
    (a last chunk with ``choices: []``); other chunks carry no usage. stream_options on a
    request that does not stream is refused as OpenAI does."""
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise HTTPError(400, "stream_options: only allowed with stream: true", "stream_options")
    if not isinstance(options, dict):
        raise HTTPError(400, "stream_options: must be an object", "stream_options")
    include = options.get("include_usage")
    if include is not None and not isinstance(include, bool):
        raise HTTPError(400, "stream_options.include_usage: must be true or false",
                        "stream_options.include_usage")
    return bool(include)


def parse_messages_field(body, model_name: str) -> list[dict]:
    """Validate a /v1/chat/completions body and return its messages (serve.chat)."""
    _check_body(body, model_name, CHAT_UNSUPPORTED)
    try:
        return parse_messages(body.get("messages"))
    except RequestError as err:
        raise HTTPError(400, str(err), str(err).split(":")[0]) from None


def chat_sampling(body: dict, prompt_tokens: int, max_len: int) -> tuple[SamplingParams, bool]:
    """(sampling params, stream) of a checked chat body whose messages render to
    ``prompt_tokens``; without max_tokens / max_completion_tokens the reply may take the room
    that prompt leaves in the ``max_len`` context. A prompt that leaves none, or a limit larger
    than the room, is a 400 naming messages or the limit field (the request has no prompt)."""
    room = max_len - prompt_tokens
    if room < 1:
        raise HTTPError(400, f"messages: the chat template renders them to {prompt_tokens} tokens, which "
                             f"leaves no room for a reply in the context of {max_len} tokens", "messages")
    limit = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    [params] = _sampling(body, limit, room, 1)
    if params.max_new_tokens > room:
        raise HTTPError(400, f"{limit}: {params.max_new_tokens} new tokens do not fit; the messages render "
                             f"to {prompt_tokens} tokens of the context of {max_len}, which leaves {room}",
                        limit)
    return params, _field(body, "stream", (bool,), False, "true or false")


def _sampling(body: dict, limit: str, default_limit: int, prompts: int) -> list[SamplingParams]:
    """The body's sampling params for each of its ``prompts``; ``limit``: the field holding the
    most new tokens. Without a seed each prompt draws its own, so a prompt sent several times
    (the way to several samples, n being 1) gives different samples; with one, all use it."""
    num = (int, float)
    max_tokens = _field(body, limit, (int,), default_limit, "an integer")
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or isinstance(stop, list)):
        raise HTTPError(400, "stop: must be a string or a list of strings", "stop")
    seed = _field(body, "seed", (int,), None, "an integer")
    try:
        params = SamplingParams(
            max_new_tokens=max_tokens,
            temperature=_field(body, "temperature", num, 1.0, "a number"),
            top_p=_field(body, "top_p", num, 1.0, "a number"),
            top_k=_field(body, "top_k", (int,), 0, "an integer"),
            seed=0 if seed is None else seed,
            stop=tuple([stop] if isinstance(stop, str) else stop or ()))
    except RequestError as err:     # "field: problem", the field as the request names it
        field, _, problem = str(err).partition(":")
        name = limit if field == "max_new_tokens" else field
        raise HTTPError(400, f"{name}:{problem}", name) from None
    return [params if seed is not None else params.replace(seed=secrets.randbits(62))
            for _ in range(prompts)]


async def _read_body(request, max_body: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_body:
        raise HTTPError(413, f"the body has {length} bytes, more than the limit of {max_body}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body:
            raise HTTPError(413, f"the body is larger than the limit of {max_body} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class Completions:
    """The /v1/completions handler: queue one engine request per prompt, await updates.
    Subclasses change how a body becomes prompts and how a choice is written."""

    id_prefix, object_name, chunk_name = "cmpl", "text_completion", "text_completion"

    def __init__(self, engine: Engine, model_name: str, max_body: int):
        self.engine, self.model_name, self.max_body = engine, model_name, max_body

    def parse(self, body) -> tuple[list, list[SamplingParams], bool]:
        """(prompts, sampling params of each, stream) of a request body."""
        return parse_completion(body, self.model_name)

    def choice(self, index: int, text: str, finish_reason: str | None) -> dict:
        return {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}

    def chunk_choice(self, index: int, text: str | None, finish_reason: str | None) -> dict:
        """A streamed choice; ``text`` None asks for the opening chunk (completions have none)."""
        return None if text is None else self.choice(index, text, finish_reason)

    async def handle(self, request):
        from starlette.responses import JSONResponse, StreamingResponse
        raw = await _read_body(request, self.max_body)
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as err:    # RecursionError: nested too deep to parse
            raise HTTPError(400, f"the body is not valid JSON ({err})") from None
        prompts, params, stream = self.parse(body)
        with_usage = stream_usage(body, stream)
        loop, updates = asyncio.get_running_loop(), asyncio.Queue()
        jobs = self._submit(prompts, params, loop, updates)
        meta = {"id": f"{self.id_prefix}-{secrets.token_hex(12)}", "created": int(time.time()),
                "model": self.model_name}
        if stream:
            return StreamingResponse(self._events(jobs, updates, meta, with_usage),
                                     media_type="text/event-stream")
        try:
            remaining = len(jobs)
            while remaining:
                index, snapshot = await updates.get()
                remaining -= snapshot["finish_reason"] is not None
        except asyncio.CancelledError:
            self._cancel(jobs)
            raise
        _raise_if_unfinished(jobs)
        choices = [self.choice(i, r.text, r.finish_reason) for i, r in enumerate(jobs)]
        return JSONResponse({**meta, "object": self.object_name, "choices": choices, "usage": _usage(jobs)})

    def _submit(self, prompts, params, loop, updates) -> list[Request]:
        def notify(index):
            def on_update(req: Request):
                snapshot = {"tokens": list(req.generated), "finish_reason": req.finish_reason, "text": req.text}
                loop.call_soon_threadsafe(updates.put_nowait, (index, snapshot))
            return on_update

        try:
            jobs = [self.engine.make_request(p, ps, notify(i)) for i, (p, ps) in enumerate(zip(prompts, params))]
        except RequestError as err:
            raise HTTPError(400, str(err), "prompt") from None
        limit = self.engine.scheduler.max_waiting
        if len(jobs) > limit:   # would be refused however long the client waits: not a 429
            raise HTTPError(400, f"{len(jobs)} prompts in one request; the server queues at most {limit}",
                            "prompt")
        submitted = []
        try:
            for job in jobs:
                submitted.append(self.engine.submit(job))
        except QueueFull as err:
            self._cancel(submitted)
            raise HTTPError(429, f"server busy: {err}; retry later", None, "rate_limit_error") from None
        except EngineStopped as err:
            self._cancel(submitted)
            raise HTTPError(503, str(err), None, "unavailable") from None
        return jobs

    def _cancel(self, jobs) -> None:
        for job in jobs:
            self.engine.cancel(job)

    async def _events(self, jobs, updates, meta, with_usage: bool):
        streams = [TextStream(self.engine.tokenizer, job.params.stop) for job in jobs]
        remaining = len(jobs)

        def event(*choices, usage=None):
            chunk = {**meta, "object": self.chunk_name, "choices": list(choices)}
            return f"data: {json.dumps({**chunk, 'usage': usage} if with_usage else chunk)}\n\n"

        try:
            for index in range(len(jobs)):
                opening = self.chunk_choice(index, None, None)
                if opening is not None:
                    yield event(opening)
            while remaining:
                index, snap = await updates.get()
                done = snap["finish_reason"] is not None
                text = streams[index].finish(snap["text"]) if done else streams[index].push(snap["tokens"])
                remaining -= done
                if text or done:
                    yield event(self.chunk_choice(index, text, snap["finish_reason"]))
            if with_usage:
                yield event(usage=_usage(jobs))
            yield "data: [DONE]\n\n"
        finally:
            self._cancel([j for j in jobs if not j.done])


class ChatCompletions(Completions):
    """/v1/chat/completions: the messages rendered by the model's chat template (serve.chat)
    are one prompt; the reply is the assistant's message."""

    id_prefix, object_name, chunk_name = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def parse(self, body):
        messages = parse_messages_field(body, self.model_name)
        template = self.engine.tokenizer.chat_template
        if template is None:
            raise HTTPError(400, "messages: this model has no chat template (its tokenizer ships none); "
                                 "use /v1/completions, or start the server with --chat-template FILE",
                            "messages")
        try:
            tokens = self.engine.tokenizer.encode(template.render(messages), special_tokens=False)
        except RequestError as err:
            raise HTTPError(400, str(err), "messages") from None
        if not tokens:
            raise HTTPError(400, "messages: the model's chat template renders them to no tokens", "messages")
        params, stream = chat_sampling(body, len(tokens), self.engine.max_len)
        return [tokens], [params], stream

    def choice(self, index, text, finish_reason):
        return {"index": index, "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason, "logprobs": None}

    def chunk_choice(self, index, text, finish_reason):
        delta = ({"role": "assistant", "content": ""} if text is None
                 else {"content": text} if text else {})
        return {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}


def _raise_if_unfinished(jobs) -> None:
    """A request the engine ended early (a failed step; cancelled at shutdown) is an error
    status, not a 200 with part of a text (``Engine.generate`` raises there too). A stream
    has sent its 200 already: there the reason arrives as the choice's finish_reason."""
    ended = next((j for j in jobs if j.finish_reason in ("error", "cancelled")), None)
    if ended is not None and ended.finish_reason == "error":
        raise HTTPError(500, f"generation failed in the engine after {len(ended.generated)} tokens "
                             "(a failed step: the server logs it)", None, "server_error")
    if ended is not None:
        raise HTTPError(503, "the request was cancelled: the server is shutting down", None, "unavailable")


def _usage(jobs) -> dict:
    prompt = sum(len(j.prompt) for j in jobs)
    completion = sum(len(j.generated) for j in jobs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class StatusCounter:
    """ASGI middleware counting responses by status code (for /metrics)."""

    def __init__(self, app):
        self.app, self.counts = app, collections.Counter()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.counts[str(message["status"])] += 1
            await send(message)
        return await self.app(scope, receive, counting_send)


def create_app(engine: Engine, *, model_name: str = "moejax", max_body: int = 1 << 20):
    """The Starlette app; the engine is started and drained with the app's lifespan."""
    import contextlib

    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route

    counter_box: dict = {}

    async def models(_request):
        return JSONResponse({"object": "list", "data": [{"id": model_name, "object": "model",
                                                         "owned_by": "moejax", "created": 0,
                                                         "max_model_len": engine.max_len}]})

    async def health(_request):
        return JSONResponse({"status": "ok", "queue": len(engine.scheduler.waiting),
                             "active": engine.scheduler.active})

    async def metrics(_request):
        counts = dict(counter_box["counter"].counts) if counter_box else {}
        return PlainTextResponse(prometheus_text(engine.stats(), counts),
                                 media_type="text/plain; version=0.0.4")

    async def on_http_error(_request, err: HTTPError):
        return _error_body(err.status, err.message, err.param, err.kind)

    async def on_starlette_error(_request, err: HTTPException):
        return _error_body(err.status_code, str(err.detail), None, "invalid_request_error")

    async def on_crash(_request, err: Exception):
        return _error_body(500, f"internal error: {type(err).__name__}", None, "server_error")

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop, True)

    app = Starlette(routes=[Route("/v1/completions", Completions(engine, model_name, max_body).handle,
                                  methods=["POST"]),
                            Route("/v1/chat/completions", ChatCompletions(engine, model_name, max_body).handle,
                                  methods=["POST"]),
                            Route("/v1/models", models), Route("/health", health), Route("/metrics", metrics)],
                    exception_handlers={HTTPError: on_http_error, HTTPException: on_starlette_error,
                                        Exception: on_crash},
                    lifespan=lifespan)
    counter = StatusCounter(app)
    counter_box["counter"] = counter
    return counter


def serve_forever(engine: Engine, *, host: str, port: int, max_body: int, model_name: str | None) -> int:
    """Run uvicorn until SIGTERM/SIGINT (graceful: in-flight requests finish first)."""
    import uvicorn
    name = model_name or Path(getattr(engine, "source", "moejax")).name or "moejax"
    app = create_app(engine, model_name=name, max_body=max_body)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            lifespan="on", timeout_graceful_shutdown=None)
    server = uvicorn.Server(config)
    print(f"compiling {len(engine.step_shapes())} step shapes (rows x widths) before taking requests...",
          file=sys.stderr, flush=True)
    start = time.perf_counter()
    engine.warmup()
    # uvicorn handles SIGTERM/SIGINT while it runs (stop accepting, drain, lifespan shutdown)
    # and afterwards re-raises them to the handler it found: make that one a no-op, so a
    # drained server returns here and exits 0 instead of dying by the signal
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    print(f"serving {name} on http://{host}:{port} (slots {engine.scheduler.num_slots}, "
          f"context {engine.max_len}; compiled in {time.perf_counter() - start:.0f} s)",
          file=sys.stderr, flush=True)
    server.run()
    stats = engine.stats()
    print(f"server stopped after draining ({stats['requests_submitted']} requests, "
          f"{stats['generated_tokens']} tokens)", file=sys.stderr, flush=True)
    return 0
