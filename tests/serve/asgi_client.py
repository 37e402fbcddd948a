"""One POST through an ASGI app in this process (no server, no lifespan: start the engine)."""

from __future__ import annotations

import asyncio
import json


def post(app, path: str, body) -> tuple[int, bytes]:
    """(status, body bytes) of POST ``path`` with ``body`` as JSON (bytes: sent as they are)."""
    messages, sent = [], []
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()

    async def receive():
        if not sent:
            sent.append(True)
            return {"type": "http.request", "body": raw, "more_body": False}
        await asyncio.Event().wait()    # the client stays connected (a stream listens for this)

    async def send(message):
        messages.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json")], "scheme": "http", "http_version": "1.1",
             "server": ("test", 80), "client": ("test", 1)}
    asyncio.run(app(scope, receive, send))
    return messages[0]["status"], b"".join(m.get("body", b"") for m in messages
                                           if m["type"] == "http.response.body")


def events(data: bytes) -> list:
    """The JSON objects of a server-sent-event stream, then '[DONE]'."""
    lines = [line[len("data: "):] for line in data.decode().split("\n") if line.startswith("data: ")]
    return [e if e == "[DONE]" else json.loads(e) for e in lines]
