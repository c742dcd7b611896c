"""Request body size limit (413), as ASGI middleware in front of everything else.

A request whose `Content-Length` is over the limit is refused before its body is read.
A chunked request (no length) is read here up to the limit and then handed on, or refused
as soon as it passes the limit, so no handler ever buffers an unbounded body.
"""

from __future__ import annotations

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from treadle.runtime.daemon.api.errors import error_response

_CLOSE = {"connection": "close"}


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
                    refusal = error_response(400, "Content-Length is not a number", headers=_CLOSE)
                    return await refusal(scope, receive, send)
        if length is not None:
            if length > self.max_bytes:
                return await _too_large(self.max_bytes)(scope, receive, send)
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
                return await _too_large(self.max_bytes)(scope, receive, send)
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


def _too_large(limit: int) -> JSONResponse:
    return error_response(413, f"the request body is larger than {limit} bytes", headers=_CLOSE)
