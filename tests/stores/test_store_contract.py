"""One contract for every `StateStore`: memory, sqlite and redis must behave alike."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from treadle.runtime.core.events import (
    EVENT_TYPES,
    Event,
    NodeFinished,
    NodeStarted,
    RunStarted,
)
from treadle.runtime.core.store import RunNotFound, RunRecord, StateStore
from treadle.runtime.stores.codec import JournalError
from treadle.runtime.stores.memory import MemoryStore
from treadle.runtime.stores.redis import RedisStore
from treadle.runtime.stores.sqlite import SqliteStore

pytestmark = pytest.mark.anyio

DURABLE = ("sqlite", "redis")


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StateStore]:
    s: StateStore
    if request.param == "memory":
        s = MemoryStore()
    elif request.param == "sqlite":
        s = SqliteStore(tmp_path / "runs.db")
    else:
        s = RedisStore(request.getfixturevalue("redis_url"))
    try:
        yield s
    finally:
        await s.close()


def run(run_id: str, **fields: Any) -> RunRecord:
    return RunRecord(run_id=run_id, graph="g", **fields)


def started(run_id: str, seq: int) -> RunStarted:
    return RunStarted(seq=seq, run_id=run_id, ts=1000.0 + seq, graph="g")


def finished(run_id: str, seq: int, node: str) -> NodeFinished:
    return NodeFinished(seq=seq, run_id=run_id, ts=1000.0 + seq, node=node, duration_s=0.5)


# -- run records --------------------------------------------------------------------------


async def test_create_and_get(store: StateStore) -> None:
    assert await store.get_run("nope") is None
    rec = run(
        "r1",
        tenant="acme",
        inputs={"q": "what?", "n": [1, 2.5, None, True], "nested": {"ü": "✓"}},
        source="flows/a.yaml",
        meta={"k": "v"},
    )
    await store.create_run(rec)
    got = await store.get_run("r1")
    assert got == rec
    assert got is not rec
    got.status = "failed"  # a copy: changing it changes nothing stored
    assert (await store.get_run("r1")) == rec


async def test_create_again_replaces_the_record_and_keeps_the_journal(store: StateStore) -> None:
    await store.create_run(run("r", tenant="a", created_at=10.0))
    await store.record("r", [started("r", 1)], {"n": b"1"})
    await store.create_run(run("r", tenant="b", created_at=20.0, status="running"))
    got = await store.get_run("r")
    assert got is not None and got.tenant == "b" and got.status == "running"
    assert [r.run_id for r in await store.list_runs(tenant="a")] == []
    assert [r.run_id for r in await store.list_runs(tenant="b")] == ["r"]
    assert await store.load_outputs("r") == {"n": b"1"}
    assert [e.seq for e in await store.read_events("r")] == [1]


async def test_update_run(store: StateStore) -> None:
    await store.create_run(run("r", created_at=5.0, updated_at=5.0))
    await store.update_run("r", status="succeeded", output={"answer": [1, "two"]}, error=None)
    got = await store.get_run("r")
    assert got is not None
    assert got.status == "succeeded"
    assert got.output == {"answer": [1, "two"]}
    assert got.updated_at > 5.0
    assert got.created_at == 5.0
    with pytest.raises(RunNotFound):
        await store.update_run("missing", status="failed")


async def test_update_run_rejects_bad_changes(store: StateStore) -> None:
    await store.create_run(run("r"))
    with pytest.raises(ValueError, match="unknown"):
        await store.update_run("r", colour="blue")
    with pytest.raises(ValueError):
        await store.update_run("r", status="exploded")
    got = await store.get_run("r")
    assert got is not None and got.status == "pending"


async def test_concurrent_updates_are_not_lost(store: StateStore) -> None:
    await store.create_run(run("r"))
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: store.update_run("r", status="running"))
        tg.start_soon(lambda: store.update_run("r", meta={"worker": "w1"}))
    got = await store.get_run("r")
    # each update sets its own field from the record as it is then, so both land
    assert got is not None and got.status == "running" and got.meta == {"worker": "w1"}


async def test_list_runs_filters_orders_and_pages(store: StateStore) -> None:
    specs = [
        ("r1", "a", "succeeded", 1.0),
        ("r2", "b", "running", 2.0),
        ("r3", "a", "running", 3.0),
        ("r4", None, "failed", 4.0),
        ("r5", "a", "succeeded", 5.0),
        ("r6", "b", "succeeded", 6.0),
    ]
    for rid, tenant, status, created in specs:
        await store.create_run(run(rid, tenant=tenant, status=status, created_at=created))

    async def ids(**kw: Any) -> list[str]:
        return [r.run_id for r in await store.list_runs(**kw)]

    assert await ids() == ["r6", "r5", "r4", "r3", "r2", "r1"]
    assert await ids(tenant="a") == ["r5", "r3", "r1"]
    assert await ids(status="succeeded") == ["r6", "r5", "r1"]
    assert await ids(tenant="a", status="running") == ["r3"]
    assert await ids(tenant="b", status="failed") == []
    assert await ids(tenant="nobody") == []
    assert await ids(limit=2) == ["r6", "r5"]
    assert await ids(limit=2, offset=2) == ["r4", "r3"]
    assert await ids(limit=10, offset=5) == ["r1"]
    assert await ids(offset=6) == []
    assert await ids(limit=0) == []
    assert await ids(status="succeeded", limit=1, offset=1) == ["r5"]
    assert await ids(tenant="a", limit=1, offset=2) == ["r1"]
    # the status filter sees a later update
    await store.update_run("r2", status="cancelled")
    assert await ids(status="running") == ["r3"]
    assert await ids(status="cancelled") == ["r2"]


async def test_list_runs_rejects_negative_paging(store: StateStore) -> None:
    with pytest.raises(ValueError):
        await store.list_runs(offset=-1)
    with pytest.raises(ValueError):
        await store.list_runs(limit=-1)


# -- journal ------------------------------------------------------------------------------


async def test_run_ids_with_a_prefix(store: StateStore) -> None:
    """14.10: what `treadle trace PREFIX` and `run --resume PREFIX` look runs up by."""
    for run_id in ("9c00cd1e", "9c00ff12", "a1b2", "a*[?]%_x"):
        await store.create_run(run(run_id))
    assert sorted(await store.run_ids_with_prefix("9c00")) == ["9c00cd1e", "9c00ff12"]
    assert await store.run_ids_with_prefix("9c00c") == ["9c00cd1e"]
    assert await store.run_ids_with_prefix("9c00cd1e") == ["9c00cd1e"]
    assert await store.run_ids_with_prefix("b") == []
    assert len(await store.run_ids_with_prefix("", limit=3)) == 3
    # characters that mean something to glob or LIKE patterns are plain characters here
    assert await store.run_ids_with_prefix("a*") == ["a*[?]%_x"]
    assert await store.run_ids_with_prefix("a*[?]%") == ["a*[?]%_x"]
    assert await store.run_ids_with_prefix("a%") == []
    assert await store.run_ids_with_prefix("a_") == []


async def test_record_outputs_and_events(store: StateStore) -> None:
    await store.create_run(run("r"))
    await store.create_run(run("other"))
    await store.record("r", [started("r", 1), finished("r", 2, "a")], {"a": b'{"x": 1}'})
    await store.record("r", [], {"b": b"[]", "c[0]": b'"\xc3\xbc"'})
    await store.record("r", [finished("r", 3, "b"), finished("r", 4, "c[0]")])
    await store.record("other", [started("other", 1)], {"a": b"2"})

    assert await store.load_outputs("r") == {"a": b'{"x": 1}', "b": b"[]", "c[0]": b'"\xc3\xbc"'}
    assert await store.load_outputs("other") == {"a": b"2"}
    assert await store.load_outputs("never") == {}
    events = await store.read_events("r")
    assert [e.seq for e in events] == [1, 2, 3, 4]
    assert events[1] == finished("r", 2, "a")
    assert [e.seq for e in await store.read_events("r", after_seq=2)] == [3, 4]
    assert await store.read_events("r", after_seq=4) == []
    assert await store.read_events("r", after_seq=99) == []
    assert [e.seq for e in await store.read_events("r", after_seq=-1)] == [1, 2, 3, 4]
    assert await store.read_events("never") == []
    # a client's Last-Event-ID or ?after= may be any number: past every seq, nothing
    for huge in (2**63 - 1, 2**64 - 1, 10**20 - 1):
        assert await store.read_events("r", after_seq=huge) == []


async def test_record_overwrites_an_output_of_the_same_node(store: StateStore) -> None:
    await store.create_run(run("r"))
    await store.record("r", [], {"a": b"1"})
    await store.record("r", [], {"a": b"2"})
    assert await store.load_outputs("r") == {"a": b"2"}


async def test_record_on_a_missing_run_raises(store: StateStore) -> None:
    with pytest.raises(RunNotFound):
        await store.record("missing", [started("missing", 1)], {"a": b"1"})
    with pytest.raises(RunNotFound):
        await store.record("missing", [])
    assert await store.load_outputs("missing") == {}
    assert await store.read_events("missing") == []


async def test_a_batch_that_breaks_the_journal_writes_nothing(store: StateStore) -> None:
    await store.create_run(run("r"))
    await store.record("r", [started("r", 1), finished("r", 2, "a")], {"a": b"1"})
    with pytest.raises(JournalError):  # repeats seq 2
        await store.record("r", [finished("r", 2, "b"), finished("r", 3, "c")], {"b": b"2"})
    with pytest.raises(JournalError):  # not increasing within the batch
        await store.record("r", [finished("r", 4, "b"), finished("r", 4, "c")], {"b": b"2"})
    with pytest.raises(JournalError):
        await store.record("r", [finished("r", 0, "b")])
    assert await store.load_outputs("r") == {"a": b"1"}
    assert [e.seq for e in await store.read_events("r")] == [1, 2]
    await store.record("r", [finished("r", 3, "b")], {"b": b"2"})
    assert [e.seq for e in await store.read_events("r")] == [1, 2, 3]


async def test_outputs_must_be_bytes(store: StateStore) -> None:
    await store.create_run(run("r"))
    with pytest.raises(TypeError):
        await store.record("r", [], {"a": "not bytes"})
    assert await store.load_outputs("r") == {}


async def test_a_long_journal_reads_back_whole(store: StateStore) -> None:
    await store.create_run(run("r"))
    seq = 0
    for batch in range(25):
        events: list[Event] = []
        for _ in range(100):
            seq += 1
            events.append(finished("r", seq, f"n{batch}"))
        await store.record("r", events, {f"n{batch}": b"0"})
    events = await store.read_events("r")
    assert [e.seq for e in events] == list(range(1, 2501))
    assert [e.seq for e in await store.read_events("r", after_seq=1499)] == list(range(1500, 2501))


async def test_concurrent_records_on_many_runs(store: StateStore) -> None:
    n = 60
    for i in range(n):
        await store.create_run(run(f"r{i}", created_at=float(i)))

    async def work(i: int) -> None:
        rid = f"r{i}"
        await store.record(rid, [started(rid, 1)], {"a": str(i).encode()})
        await store.record(rid, [finished(rid, 2, "a")])

    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(work, i)
        # a bad call among them fails alone
        with pytest.raises(RunNotFound):
            await store.record("missing", [started("missing", 1)])
    for i in range(n):
        assert await store.load_outputs(f"r{i}") == {"a": str(i).encode()}
        assert [e.seq for e in await store.read_events(f"r{i}")] == [1, 2]


# -- every event type round-trips exactly ---------------------------------------------------

_SAMPLES: dict[str, Any] = {
    "str": 'tëxt "quoted" \\ \n ✓ 🧵',
    "int": 123456789012,
    "float": 0.1 + 0.2,
    "bool": True,
    "str | None": "an error",
    "float | None": 1e-300,
    "int | None": 8000,
    "list[str]": ["a[0]", "a[1]", "ü"],
    # a request's answer schema and default: any JSON value
    "dict[str, Any]": {"type": "object", "properties": {"ok": {"type": "boolean"}}},
    "Any": {"nested": [1, 2.5, None, "x"]},
}


def sample_event(cls: type[Event], seq: int) -> Event:
    values: dict[str, Any] = {"seq": seq, "run_id": "r", "ts": 1_700_000_000.123456789}
    for f in dataclasses.fields(cls):
        if f.name in values:
            continue
        if f.type not in _SAMPLES:
            raise AssertionError(f"no sample value for {cls.__name__}.{f.name}: {f.type}")
        values[f.name] = _SAMPLES[f.type]
    return cls(**values)


async def test_every_event_type_round_trips_exactly(store: StateStore) -> None:
    await store.create_run(run("r"))
    events = [sample_event(cls, i + 1) for i, cls in enumerate(EVENT_TYPES.values())]
    # the None branch of optional fields, and float edge cases, in a second pass
    more: list[Event] = [
        NodeStarted(seq=len(events) + 1, run_id="r", ts=-0.0, node="", attempt=0),
        dataclasses.replace(
            sample_event(EVENT_TYPES["llm_call_finished"], len(events) + 2),
            ttft_s=None,
            replica=None,
            error=None,
            duration_s=math.inf,
        ),
    ]
    await store.record("r", events)
    await store.record("r", more)
    back = await store.read_events("r")
    assert {type(e) for e in back} == set(EVENT_TYPES.values())
    for sent, got in zip(events + more, back, strict=True):
        assert type(got) is type(sent)
        assert got == sent
        assert got.to_dict() == sent.to_dict()
        assert repr(got) == repr(sent)  # -0.0 vs 0.0, inf: compared as written
