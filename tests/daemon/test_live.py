"""Live events: a run's events reach its event stream as they happen (the workers publish
them live), merged with the journal in seq order; the stored status is `running` while
it runs; tokens stream; a worker numbers its events after what clients saw live."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from daemon_support import LiveServer, journal, make_config, open_daemon, submit
from gates import gate
from test_sse import parse_sse
from ui_support import ANSWER, HELD

from treadle.runtime.core.events import LLMTokens, NodeStarted, RunStarted, RunWaiting
from treadle.runtime.daemon.api.app import create_app
from treadle.runtime.daemon.api.sse import _Merge
from treadle.runtime.daemon.live import first_free_seq

pytestmark = pytest.mark.anyio


@pytest.fixture
async def gated(redis_url: str) -> Any:
    """A daemon whose workflows may call `gates`, with one worker, on a real socket."""
    config = make_config(redis_url, allow_imports=("gates",))
    async for daemon in open_daemon(config, workers=0):
        with LiveServer(create_app(config, workers=1)) as server:
            yield daemon, server


async def test_events_are_live_before_the_journal_has_them(gated: Any) -> None:
    daemon, server = gated
    name = uuid.uuid4().hex
    key = await daemon.tenant("acme")
    await daemon.register(key, HELD.format(gate=name, answer=ANSWER))
    run_id = await submit(daemon, key, "held", "live")
    store = daemon.services.store
    seen: list[dict[str, Any]] = []
    async with (
        httpx.AsyncClient(
            base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=30
        ) as c,
        c.stream("GET", f"/v1/runs/{run_id}/events") as resp,
    ):
        buffer = ""
        async for chunk in resp.aiter_text():
            buffer += chunk
            complete, _, buffer = buffer.rpartition("\n\n")
            for message in parse_sse(complete + "\n\n") if complete else []:
                seen.append(message)
                data = message["data"]
                if message["event"] == "node_started" and data["node"] == "wait":
                    # the node cannot finish before the gate opens: nothing after the
                    # first node's commit can be in the journal yet
                    journaled = await journal(store, run_id)
                    assert not any(
                        isinstance(e, NodeStarted) and e.node == "wait" for e in journaled
                    )
                    assert data["seq"] > journaled[-1].seq
                    record = await store.get_run(run_id)
                    assert record is not None and record.status == "running"
                    assert (await c.get(f"/v1/runs/{run_id}")).json()["status"] == "running"
                    gate(name).set()
    events = await journal(store, run_id)
    assert [int(m["id"]) for m in seen] == [e.seq for e in events]  # each once, in order
    assert seen[-1]["event"] == "run_finished" and seen[-1]["data"]["status"] == "succeeded"
    # the last node's answer streamed as tokens, which add up to its output
    record = await store.get_run(run_id)
    assert record is not None
    tokens = [e for e in events if isinstance(e, LLMTokens) and e.node == "last"]
    assert tokens and "".join(e.text for e in tokens) == record.output["text"]


async def test_a_worker_numbers_events_after_those_seen_live(redis_url: str) -> None:
    """A worker that died after reserving seqs up to 40 for live events, none journaled:
    the next one starts at 41, so a client that saw 40 misses nothing of the new run. A
    run that parked cleanly goes on from its journal's last seq."""
    config = make_config(redis_url)
    async for daemon in open_daemon(config, workers=0):
        key = await daemon.tenant("acme")
        await daemon.register(key)
        run_id = await submit(daemon, key, "five", "floor")
        meta = daemon.services.store.keys.meta(run_id)
        await daemon.services.redis.hset(meta, "live_seq", 40)
    async for daemon in open_daemon(config, workers=1):
        body = await daemon.wait_run(key, run_id)
        assert body["status"] == "succeeded"
        events = await journal(daemon.services.store, run_id)
        assert events[0].seq == 41 and isinstance(events[0], RunStarted)
    assert first_free_seq(12, 300, RunWaiting(12, "r", 0.0, nodes=["ask"])) == 12
    assert first_free_seq(12, 300, NodeStarted(12, "r", 0.0, node="a")) == 300
    assert first_free_seq(0, 0, None) == 0


def run_merge(steps: list[tuple[str, int]], after: int = 0) -> Iterator[int]:
    merge = _Merge(after)
    for source, seq in steps:
        event = RunStarted(seq, "r", 0.0, graph="g")
        feed = merge.from_journal if source == "journal" else merge.from_live
        for out in feed(event):
            yield out.seq


def test_merge_orders_live_and_journal_events() -> None:
    # live in order, then the journal repeats them: each once
    assert list(run_merge([("live", 1), ("live", 2), ("journal", 1), ("journal", 2)])) == [1, 2]
    # the live stream lost 2: 3 waits for the journal's 2
    assert list(run_merge([("live", 1), ("live", 3), ("journal", 1), ("journal", 2)])) == [1, 2, 3]
    # the journal skips 2 (seen live only, by a worker that died): it never comes, 3 goes on
    assert list(run_merge([("live", 1), ("journal", 1), ("journal", 3)])) == [1, 3]
    # held live events before a journal event go first, in order
    assert list(run_merge([("live", 2), ("live", 3), ("journal", 4)])) == [2, 3, 4]
    # resumed from a seq: older events are not sent again
    assert list(run_merge([("journal", 5), ("live", 6), ("live", 7)], after=5)) == [6, 7]


def test_merge_sends_what_only_came_live_when_the_run_ends() -> None:
    merge = _Merge(0)
    assert [e.seq for e in merge.from_live(RunStarted(3, "r", 0.0, graph="g"))] == []
    rest = [RunStarted(1, "r", 0.0, graph="g"), RunStarted(4, "r", 0.0, graph="g")]
    assert [e.seq for e in merge.rest(rest)] == [1, 3, 4]
