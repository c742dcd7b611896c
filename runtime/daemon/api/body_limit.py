"""Request bodies: a size limit (413) and a time limit (408), as ASGI middleware in front
of everything else.

A request whose `Content-Length` is over the size limit is refused before its body is read.
Otherwise the body is read here, at most up to the limit (a chunked body is refused as soon
as it passes it) and within `timeout_s` of the request's head, then handed on; so no handler
ever buffers an unbounded body or waits on a client that sends it slowly (or never). (The
head's own time limit is the server's: `treadle.runtime.daemon.api.server`.)
"""

from __future__ import annotations

import anyio
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from treadle.runtime.daemon.api.errors import error_response

_CLOSE = {"connection": "close"}


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float = 30.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    refusal = error_response(400, "Content-Length is not a number", headers=_CLOSE)
                    return await refusal(scope, receive, send)
                if length > self.max_bytes:
                    return await _too_large(self.max_bytes)(scope, receive, send)
        chunks: list[bytes] = []
        size = 0
        with anyio.move_on_after(self.timeout_s) as deadline:
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
        if deadline.cancelled_caught:
            late = error_response(
                408, f"the request body did not arrive within {self.timeout_s:g} s",
                headers=_CLOSE,
            )  # fmt: skip
            return await late(scope, receive, send)
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
