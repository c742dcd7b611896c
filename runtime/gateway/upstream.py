"""The replicas of one served model: which one a call goes to, and how it is sent.

A `ModelPool` routes each call with a policy of `treadle.backends.dispatch.routing`
(prefix-aware `treadle` by default: longest cached prefix against load, program affinity),
skips replicas whose circuit breaker is open (`treadle.backends.dispatch.pool`), and
builds the upstream request: the client's body as it came, the replica's model name, and
the fields through which the replica's dialect receives treadle's hints. One
`httpx.AsyncClient` with a large connection pool serves every replica.

The prompt is rendered and cut into prefix chunks from the raw JSON messages (no model
objects are built on the hot path); the rendering matches `treadle.backends.tokens.
prompt_text`, so equal conversation prefixes give equal chunk hashes.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from treadle.backends.base import SchedulingHints
from treadle.backends.dispatch.pool import CircuitBreaker
from treadle.backends.dispatch.routing import (
    DEFAULT_CHUNK_TOKENS,
    NoReplicaAvailable,
    RequestFeatures,
    Router,
    Ticket,
    chain_text_chunks,
    make_routing_policy,
)
from treadle.backends.openai_compat.dialects import Dialect
from treadle.runtime.gateway.config import GatewayConfig, ModelConfig

#: characters per token of the estimate (as `treadle.backends.tokens.CHARS`)
CHARS_PER_TOKEN = 4


@dataclass(eq=False)
class Replica:
    name: str
    chat_url: str
    root_url: str
    model: str
    dialect: Dialect
    headers: dict[str, str]
    breaker: CircuitBreaker
    last_error: str | None = None
    requests: int = 0
    failures: int = 0


@dataclass(frozen=True, slots=True)
class Routed:
    """A call's replica and the router's ticket for it."""

    replica: Replica
    ticket: Ticket
    index: int


class ModelPool:
    """One served model's replicas (module docstring)."""

    def __init__(self, served: str, config: ModelConfig, *, clock: Any = time.monotonic) -> None:
        self.served = served
        self.clock = clock
        self.replicas: list[Replica] = []
        for i, rc in enumerate(config.replicas):
            base = rc.url if rc.url.endswith("/v1") else rc.url + "/v1"
            headers = {}
            key = rc.api_key()
            if key is not None:
                headers["Authorization"] = f"Bearer {key}"
            self.replicas.append(
                Replica(
                    name=rc.name or f"{served}-{i}",
                    chat_url=base + "/chat/completions",
                    root_url=base[: -len("/v1")],
                    model=rc.model or served,
                    dialect=rc.make_dialect(),
                    headers=headers,
                    breaker=CircuitBreaker(3, 10.0, clock),
                )
            )
        names = [r.name for r in self.replicas]
        if len(set(names)) != len(names):
            raise ValueError(f"model {served!r}: replica names must be unique, got {names}")
        self.router = Router(make_routing_policy(config.routing, len(self.replicas)), names)

    def features(self, body: dict[str, Any], program_id: str | None) -> RequestFeatures:
        text = prompt_text_raw(body)
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 0
        return RequestFeatures(
            chunks=chain_text_chunks(text, DEFAULT_CHUNK_TOKENS * CHARS_PER_TOKEN),
            prompt_tokens=max(1, len(text) // CHARS_PER_TOKEN),
            output_tokens=max_tokens if isinstance(max_tokens, int) else 0,
            program_id=program_id,
            now=self.clock(),
        )

    def route(self, features: RequestFeatures, tried: set[int]) -> Routed:
        any_usable = False
        for i, replica in enumerate(self.replicas):
            usable = i not in tried and replica.breaker.can_execute()
            self.router.set_available(i, usable)
            any_usable = any_usable or usable
        if not any_usable:
            raise NoReplicaAvailable(self.describe(tried))
        ticket = self.router.route(features)
        replica = self.replicas[ticket.replica]
        replica.breaker.on_attempt()
        replica.requests += 1
        return Routed(replica, ticket, ticket.replica)

    def first_token(self, routed: Routed) -> None:
        self.router.prefill_done(routed.ticket)

    def succeeded(self, routed: Routed, cached_tokens: int | None) -> None:
        routed.replica.breaker.on_success()
        self.router.finish(routed.ticket, now=self.clock(), cached_tokens=cached_tokens)

    def failed(self, routed: Routed, error: str, *, replica_fault: bool) -> None:
        """The call failed there: `replica_fault` counts against the replica's breaker
        (cannot connect, 5xx); otherwise (a 4xx, the client went away) it says nothing."""
        self.router.finish(routed.ticket, now=self.clock(), ok=False)
        if replica_fault:
            routed.replica.failures += 1
            routed.replica.last_error = error
            routed.replica.breaker.on_failure()
        else:
            routed.replica.breaker.release_trial()

    def describe(self, tried: set[int]) -> str:
        parts = []
        for i, r in enumerate(self.replicas):
            state = r.breaker.state.value
            note = " (failed for this call)" if i in tried else ""
            err = f", last error: {r.last_error}" if r.last_error else ""
            parts.append(f"{r.name}: breaker {state}{note}{err}")
        return f"no usable replica for model {self.served!r}: " + "; ".join(parts)


def upstream_request(
    replica: Replica,
    body: dict[str, Any],
    hints: SchedulingHints,
    trace_headers: dict[str, str],
) -> tuple[bytes, dict[str, str]]:
    """The body and headers sent to `replica`: the client's body with the replica's model
    name, usage asked for when streaming (the gateway accounts tokens), and the dialect's
    hint fields. A fresh request id per send: a server refuses an id it still holds."""
    dialect = replica.dialect
    out = dict(body)
    out["model"] = replica.model
    if out.get("stream") and dialect.stream_usage:
        options = out.get("stream_options")
        out["stream_options"] = {
            **(options if isinstance(options, dict) else {}),
            "include_usage": True,
        }
    if hints.request_id is not None:
        hints = hints.model_copy(
            update={"request_id": f"{hints.request_id}.{uuid.uuid4().hex[:8]}"}
        )
    fields, headers = dialect.hint_fields(hints)
    out.update(fields)
    merged = {"content-type": "application/json", **replica.headers, **headers, **trace_headers}
    return orjson.dumps(out), merged


def prompt_text_raw(body: dict[str, Any]) -> str:
    """`treadle.backends.tokens.prompt_text` of a raw chat body (validated messages)."""
    parts: list[str] = []
    tools = body.get("tools")
    if tools:
        parts.append(orjson.dumps(tools, option=orjson.OPT_SORT_KEYS).decode())
    for message in body["messages"]:
        content = message.get("content")
        if isinstance(content, list):  # content parts: their text
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        parts.append(f"<|{message['role']}|>{content or ''}")
        for call in message.get("tool_calls") or ():
            function = call.get("function") or {} if isinstance(call, dict) else {}
            parts.append(f"<|call|>{function.get('name', '')}{function.get('arguments', '')}")
    return "\n".join(parts)


def make_client(config: GatewayConfig) -> httpx.AsyncClient:
    """The one client for every replica: enough connections for thousands of streams."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(config.timeout_s, connect=config.connect_timeout_s),
        # idle connections are dropped before the engines' own keep-alive (uvicorn's 5 s,
        # vLLM's default) closes them: reusing one the server is closing fails the call
        limits=httpx.Limits(
            max_connections=4096, max_keepalive_connections=1024, keepalive_expiry=4.0
        ),
    )
