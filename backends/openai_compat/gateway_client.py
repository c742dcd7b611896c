"""The `gateway` backend: a worker's calls go to `treadle gateway`, which schedules the
calls of every worker together, with the run's hints (`hint_wire`).

    models:
      default: {backend: gateway, url: "http://gateway:9000/v1"}

It is the `openai_compat` backend with the `gateway` dialect, plus what a gateway that
restarts needs: a call that fails because the gateway went away (cannot connect, the
connection broke, a 5xx) is sent again, with backoff, for up to `outage_s` seconds, so a
gateway crash or restart costs a run time, not its calls. A stream is sent again only
while nothing of it has been handed on; after that the node's own retry policy decides.
"""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import anyio

from treadle.backends.base import BackendError, LLMRequest, LLMResponse, StreamChunk
from treadle.backends.openai_compat.backend import OpenAICompatBackend
from treadle.backends.openai_compat.dialects import GatewayDialect


class GatewayBackend(OpenAICompatBackend):
    """`treadle gateway` as a backend (module docstring). `model` is the name the gateway
    serves the model under (its `--model`, "default" unless configured)."""

    def __init__(
        self,
        url: str,
        model: str = "default",
        *,
        outage_s: float = 30.0,
        backoff_s: float = 0.1,
        max_backoff_s: float = 2.0,
        **options: Any,
    ) -> None:
        if outage_s < 0:
            raise ValueError("outage_s must be >= 0")
        # the backend's own retries cover one send; the outage loop here covers a restart
        super().__init__(
            url,
            model,
            dialect=GatewayDialect(),
            backoff_s=backoff_s,
            max_backoff_s=max_backoff_s,
            **options,
        )
        self.outage_s = outage_s
        #: calls sent again because the gateway failed (for tests and metrics)
        self.resent = 0

    async def generate(
        self,
        request: LLMRequest,
        *,
        extra_headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> LLMResponse:
        deadline = time.monotonic() + self.outage_s
        attempt = 0
        while True:
            try:
                return await super().generate(
                    request, extra_headers=extra_headers, extra_body=extra_body
                )
            except BackendError as exc:
                attempt += 1
                await self._wait_or_raise(exc, attempt, deadline)

    async def stream(
        self,
        request: LLMRequest,
        *,
        extra_headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> AsyncIterator[StreamChunk]:
        deadline = time.monotonic() + self.outage_s
        attempt = 0
        while True:
            yielded = False
            try:
                async for chunk in super().stream(
                    request, extra_headers=extra_headers, extra_body=extra_body
                ):
                    yielded = True
                    yield chunk
                return
            except BackendError as exc:
                if yielded:
                    raise
                attempt += 1
                await self._wait_or_raise(exc, attempt, deadline)

    async def _wait_or_raise(self, exc: BackendError, attempt: int, deadline: float) -> None:
        if not exc.retryable or time.monotonic() >= deadline:
            raise exc
        self.resent += 1
        delay = min(self.max_backoff_s, self.backoff_s * 2 ** min(attempt, 10))
        await anyio.sleep(delay * (0.5 + random.random() / 2))
