"""The service benchmark's load: open-loop submissions over plain keep-alive connections.

`Load.run_phase` schedules a phase's submissions at its rate and hands them to a fixed set of
connections (`Connection`: HTTP/1.1 spoken with h11 over an anyio stream); each request's
latency counts from when it was due, so waiting for a free connection (a slow API) is
measured, not hidden. Every `CROSS_EVERY`th submission also tries to read another tenant's
run, which must answer 404.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx

CROSS_EVERY = 10  # every Nth submit also tries to read another tenant's run
#: what a request on a broken connection raises (or on an answer that is not HTTP)
CONNECTION_ERRORS = (OSError, anyio.EndOfStream, anyio.BrokenResourceError, ValueError)


@dataclass
class Phase:
    name: str
    rate: float
    duration_s: float
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    accepted: dict[str, str] = field(default_factory=dict)  # run id -> tenant
    client_errors: int = 0
    submits: int = 0
    cross_attempts: int = 0
    cross_allowed: int = 0
    worker_kills: int = 0
    redis_restarts: int = 0
    started: float = 0.0
    ended: float = 0.0


class Connection:
    """One keep-alive HTTP/1.1 connection over an anyio stream, with just the HTTP this
    benchmark needs (requests with a length, answers with a length or chunked). The load
    generator shares the machine's cores with the system it measures: httpx's connection
    pool costs several milliseconds of CPU per request once hundreds of requests wait on it,
    and even h11 a millisecond per run; this costs a fraction of that."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._stream: Any = None
        self._buffer = b""
        self._host_line = f"host: {host}:{port}\r\n"

    async def request(
        self, method: str, target: str, headers: dict[str, str], body: bytes = b""
    ) -> tuple[int, bytes]:
        if self._stream is None:
            self._stream = await anyio.connect_tcp(self.host, self.port)
            self._buffer = b""
        lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        head = f"{method} {target} HTTP/1.1\r\n{self._host_line}content-length: {len(body)}\r\n"
        try:
            await self._stream.send(f"{head}{lines}\r\n".encode() + body)
            return await self._response()
        except CONNECTION_ERRORS:
            await self.close()
            raise

    async def _response(self) -> tuple[int, bytes]:
        while (end := self._buffer.find(b"\r\n\r\n")) < 0:
            await self._fill()
        head, self._buffer = self._buffer[:end], self._buffer[end + 4 :]
        status_line, *header_lines = head.split(b"\r\n")
        status = int(status_line.split(b" ", 2)[1])
        fields = {}
        for line in header_lines:
            name, _, value = line.partition(b":")
            fields[name.strip().lower()] = value.strip().lower()
        if fields.get(b"transfer-encoding") == b"chunked":
            body = await self._chunked()
        else:
            length = int(fields.get(b"content-length", b"0"))
            while len(self._buffer) < length:
                await self._fill()
            body, self._buffer = self._buffer[:length], self._buffer[length:]
        if fields.get(b"connection") == b"close":
            await self.close()
        return status, body

    async def _chunked(self) -> bytes:
        chunks: list[bytes] = []
        while True:
            while (end := self._buffer.find(b"\r\n")) < 0:
                await self._fill()
            size = int(self._buffer[:end].split(b";")[0], 16)
            while len(self._buffer) < end + 2 + size + 2:
                await self._fill()
            chunks.append(self._buffer[end + 2 : end + 2 + size])
            self._buffer = self._buffer[end + 2 + size + 2 :]
            if size == 0:
                return b"".join(chunks)

    async def _fill(self) -> None:
        data = await self._stream.receive(65536)
        if not data:
            raise anyio.EndOfStream
        self._buffer += data

    async def close(self) -> None:
        if self._stream is not None:
            with contextlib.suppress(Exception):
                await self._stream.aclose()
        self._stream, self._buffer = None, b""


class Load:
    """Open-loop load: submissions are scheduled at the phase's rate and handed to a fixed
    set of connections; a request's latency counts from its SCHEDULED time, so time spent
    waiting for a free connection (a slow API) is measured, not hidden."""

    def __init__(self, url: str, keys: dict[str, str], seed: int, connections: int = 64):
        parsed = httpx.URL(url)
        self.host, self.port = parsed.host, parsed.port or 80
        self.keys = keys
        self.tenants = list(keys)
        self.rng = random.Random(seed)
        self.connections = connections
        self.counter = 0

    async def register(self, tenant: str, definition: str) -> None:
        conn = Connection(self.host, self.port)
        body = json.dumps({"definition": definition}).encode()
        headers = {**self._auth(tenant), "content-type": "application/json"}
        status, text = await conn.request("POST", "/v1/workflows", headers, body)
        await conn.close()
        if status != 201:
            raise RuntimeError(f"registering for {tenant}: {status} {text[:300]!r}")

    async def run_phase(self, phase: Phase) -> None:
        phase.started = time.time()
        start = time.perf_counter()
        total = int(phase.rate * phase.duration_s)
        send, receive = anyio.create_memory_object_stream[float](max_buffer_size=total + 1)
        async with anyio.create_task_group() as tg:
            for _ in range(self.connections):
                tg.start_soon(self._connection_loop, phase, receive.clone())
            receive.close()
            async with send:
                for i in range(total):
                    due = start + i / phase.rate
                    delay = due - time.perf_counter()
                    if delay > 0:
                        await anyio.sleep(delay)
                    send.send_nowait(due)
                phase.ended = time.time()  # the last request is due: the window closes

    async def _connection_loop(self, phase: Phase, due_times: Any) -> None:
        conn = Connection(self.host, self.port)
        try:
            async with due_times:
                async for due in due_times:
                    await self._submit(phase, conn, due)
        finally:
            await conn.close()

    async def _request(
        self, phase: Phase, conn: Connection, method: str, target: str, tenant: str,
        body: bytes = b"", since: float | None = None,
    ) -> tuple[int, bytes] | None:  # fmt: skip
        sent = time.perf_counter() if since is None else since
        headers = self._auth(tenant)
        if body:
            headers["content-type"] = "application/json"
        try:
            status, data = await conn.request(method, target, headers, body)
        except CONNECTION_ERRORS:
            phase.client_errors += 1
            return None
        phase.latencies.append(time.perf_counter() - sent)
        phase.statuses[status] += 1
        return status, data

    async def _submit(self, phase: Phase, conn: Connection, due: float) -> None:
        self.counter += 1
        phase.submits += 1
        n = self.counter
        tenant = self.tenants[n % len(self.tenants)]
        body = json.dumps({"workflow": "five", "inputs": {"topic": f"topic {n}"}}).encode()
        answer = await self._request(phase, conn, "POST", "/v1/runs", tenant, body, since=due)
        if answer is not None and answer[0] == 201:
            phase.accepted[json.loads(answer[1])["run_id"]] = tenant
        if n % CROSS_EVERY == 0 and len(phase.accepted) > 1:
            await self._cross_read(phase, conn, tenant)

    async def _cross_read(self, phase: Phase, conn: Connection, reader: str) -> None:
        # somebody else's run: it exists, so anything but a 404 would be a leak
        for run_id, owner in self.rng.sample(list(phase.accepted.items()), 2):
            if owner == reader:
                continue
            for target in (f"/v1/runs/{run_id}", f"/v1/runs/{run_id}/events?follow=false"):
                answer = await self._request(phase, conn, "GET", target, reader)
                if answer is None:
                    continue
                phase.cross_attempts += 1
                if answer[0] != 404:
                    phase.cross_allowed += 1
            return

    def _auth(self, tenant: str) -> dict[str, str]:
        return {"authorization": f"Bearer {self.keys[tenant]}"}
