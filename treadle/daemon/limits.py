"""Request body size limit (413), as ASGI middleware in front of everything else.

A request whose `Content-Length` is over the limit is refused before its body is read.
A chunked request (no length) is read here up to the limit and then handed on, or refused
as soon as it passes the limit, so no handler ever buffers an unbounded body.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length: int | None = None
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    return await _refuse(send, 400, "bad_request", "Content-Length is not a number")
        if length is not None:
            if length > self.max_bytes:
                return await _too_large(send, self.max_bytes)
            return await self.app(scope, receive, send)
        # no length given: read (at most the limit) here, then replay it
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                return await _too_large(send, self.max_bytes)
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


async def _too_large(send: Send, limit: int) -> None:
    await _refuse(send, 413, "request_too_large", f"the request body is larger than {limit} bytes")


async def _refuse(send: Send, status: int, code: str, message: str) -> None:
    body: dict[str, Any] = {"error": {"code": code, "message": message}}
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})
