"""Event streams (Server-Sent Events) on a live server: complete, live, and resumable from
a sequence number with `?after=` or `Last-Event-ID`; the CLI client's reconnecting reader."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest
from daemon_support import Daemon, LiveServer, journal, slow_workflow, submit

from treadle.runtime.daemon.api.app import create_app
from treadle.runtime.daemon.client import DaemonClient

pytestmark = pytest.mark.anyio

WORKFLOW = slow_workflow(latency_s=0.1, steps=6)


@pytest.fixture
def live(api_only: Daemon) -> Iterator[LiveServer]:
    """The API with one worker on a real socket (the fixture's own app has no worker)."""
    with LiveServer(create_app(api_only.config, workers=1)) as server:
        yield server


def parse_sse(text: str) -> list[dict[str, Any]]:
    messages = []
    for block in text.split("\n\n"):
        fields: dict[str, Any] = {}
        for line in block.splitlines():
            if line.startswith(":"):
                continue
            name, _, value = line.partition(": ")
            fields[name] = value
        if "data" in fields:
            fields["data"] = json.loads(fields["data"])
            messages.append(fields)
    return messages


async def finished_run(api_only: Daemon, key: str) -> str:
    run_id = await submit(api_only, key, "slow", "sse")
    final = await api_only.wait_run(key, run_id)
    assert final["status"] == "succeeded"
    return run_id


async def test_complete_stream_and_resume_points(api_only: Daemon, live: LiveServer) -> None:
    key = await api_only.tenant("acme")
    await api_only.register(key, WORKFLOW)
    run_id = await finished_run(api_only, key)
    seqs = [e.seq for e in await journal(api_only.services.store, run_id)]
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=live.url, headers=headers) as c:
        full = await c.get(f"/v1/runs/{run_id}/events")
        assert full.headers["content-type"].startswith("text/event-stream")
        messages = parse_sse(full.text)
        assert [int(m["id"]) for m in messages] == seqs
        assert messages[0]["event"] == "run_started"
        assert messages[-1]["event"] == "run_finished" and messages[-1]["data"]["status"] == (
            "succeeded"
        )
        after = parse_sse((await c.get(f"/v1/runs/{run_id}/events?after=5")).text)
        assert [int(m["id"]) for m in after] == seqs[5:]
        resumed = await c.get(f"/v1/runs/{run_id}/events", headers={"Last-Event-ID": "7"})
        assert [int(m["id"]) for m in parse_sse(resumed.text)] == seqs[7:]
        bad = await c.get(f"/v1/runs/{run_id}/events", headers={"Last-Event-ID": "x"})
        assert bad.status_code == 422


async def test_live_stream_follows_the_run_and_resumes_after_a_drop(
    api_only: Daemon, live: LiveServer
) -> None:
    key = await api_only.tenant("acme")
    await api_only.register(key, WORKFLOW)
    run_id = await submit(api_only, key, "slow", "live")
    headers = {"Authorization": f"Bearer {key}"}
    first: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=live.url, headers=headers, timeout=30) as c:
        async with c.stream("GET", f"/v1/runs/{run_id}/events") as resp:
            buffer = ""
            async for chunk in resp.aiter_text():
                buffer += chunk
                first = parse_sse(buffer.rsplit("\n\n", 1)[0] + "\n\n")
                if len(first) >= 6:
                    break  # drop the connection mid-run
        now = (await c.get(f"/v1/runs/{run_id}")).json()
        assert now["status"] == "running"  # it really was live
        last_id = first[-1]["id"]
        rest = await c.get(f"/v1/runs/{run_id}/events", headers={"Last-Event-ID": last_id})
    seen = [int(m["id"]) for m in first + parse_sse(rest.text)]
    journal_seqs = [e.seq for e in await journal(api_only.services.store, run_id)]
    assert seen == journal_seqs  # no gap, no repeat
    assert parse_sse(rest.text)[-1]["event"] == "run_finished"


async def test_client_reader_follows_to_the_end(api_only: Daemon, live: LiveServer) -> None:
    key = await api_only.tenant("acme")
    await api_only.register(key, WORKFLOW)
    run_id = await submit(api_only, key, "slow", "client")

    def read_all() -> list[dict[str, Any]]:
        with DaemonClient(live.url, key) as client:
            return list(client.events(run_id, after=2))

    events = await anyio.to_thread.run_sync(read_all)
    journal_seqs = [e.seq for e in await journal(api_only.services.store, run_id)]
    assert [e["seq"] for e in events] == journal_seqs[2:]
    assert events[-1]["kind"] == "run_finished"


class CuttingProxy:
    """A TCP proxy to `port` that cuts every connection after `limit` bytes of answer: a
    network that drops long-lived streams."""

    def __init__(self, port: int, limit: int) -> None:
        self.upstream = port
        self.limit = limit
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            self.connections += 1
            server = socket.create_connection(("127.0.0.1", self.upstream))
            threading.Thread(target=self._pipe, args=(client, server, None), daemon=True).start()
            threading.Thread(
                target=self._pipe, args=(server, client, self.limit), daemon=True
            ).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket, limit: int | None) -> None:
        sent = 0
        try:
            while limit is None or sent < limit:
                data = src.recv(min(4096, limit - sent) if limit is not None else 4096)
                if not data:
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def close(self) -> None:
        self.listener.close()


async def test_client_reader_survives_dropped_connections(
    api_only: Daemon, live: LiveServer
) -> None:
    """Every connection is cut a few events in: the reader reconnects from the last seq it
    saw, so it gets the whole journal once, in order."""
    key = await api_only.tenant("acme")
    await api_only.register(key, WORKFLOW)
    run_id = await submit(api_only, key, "slow", "cut")
    proxy = CuttingProxy(live.port, limit=1500)

    def read_all() -> list[dict[str, Any]]:
        with DaemonClient(proxy.url, key) as client:
            return list(client.events(run_id))

    try:
        events = await anyio.to_thread.run_sync(read_all)
    finally:
        proxy.close()
    journal_seqs = [e.seq for e in await journal(api_only.services.store, run_id)]
    assert [e["seq"] for e in events] == journal_seqs  # no gap, no repeat
    assert events[-1]["kind"] == "run_finished"
    assert proxy.connections > 2  # it really was cut, more than once
