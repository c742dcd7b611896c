"""`SqliteStore` specifics: durability across reopening, sharing one file, its setup."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
import pytest

from treadle.runtime.core.events import NodeFinished, RunStarted
from treadle.runtime.core.store import RunRecord
from treadle.runtime.stores.sqlite import DEFAULT_PATH, SqliteStore

pytestmark = pytest.mark.anyio


def finished(run_id: str, seq: int) -> NodeFinished:
    return NodeFinished(seq=seq, run_id=run_id, ts=float(seq), node=f"n{seq}", duration_s=0.25)


async def test_data_survives_closing_and_reopening(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "runs.db"  # parent folders are created
    store = SqliteStore(path)
    await store.create_run(RunRecord(run_id="r", graph="g", tenant="t", inputs={"x": 1}))
    await store.record(
        "r", [RunStarted(seq=1, run_id="r", ts=1.0, graph="g"), finished("r", 2)], {"n2": b"{}"}
    )
    await store.update_run("r", status="running")
    await store.close()
    await store.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        await store.get_run("r")

    again = SqliteStore(path)
    try:
        rec = await again.get_run("r")
        assert rec is not None and rec.status == "running" and rec.inputs == {"x": 1}
        assert await again.load_outputs("r") == {"n2": b"{}"}
        assert [e.seq for e in await again.read_events("r")] == [1, 2]
        assert [r.run_id for r in await again.list_runs(tenant="t", status="running")] == ["r"]
        # the journal continues where it stopped
        await again.record("r", [finished("r", 3)])
        assert [e.seq for e in await again.read_events("r", after_seq=2)] == [3]
    finally:
        await again.close()


async def test_the_file_is_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    store = SqliteStore(path)
    await store.create_run(RunRecord(run_id="r", graph="g"))
    await store.close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    finally:
        conn.close()


async def test_two_stores_on_one_file(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    a, b = SqliteStore(path), SqliteStore(path)
    try:
        await a.create_run(RunRecord(run_id="ra", graph="g", created_at=1.0))
        await b.create_run(RunRecord(run_id="rb", graph="g", created_at=2.0))

        async def write(store: SqliteStore, run_id: str) -> None:
            for seq in range(1, 101):
                await store.record(run_id, [finished(run_id, seq)], {f"n{seq}": b"1"})

        # two connections on two threads contend for the write lock
        async with anyio.create_task_group() as tg:
            tg.start_soon(write, a, "ra")
            tg.start_soon(write, b, "rb")
        for store in (a, b):
            assert [r.run_id for r in await store.list_runs()] == ["rb", "ra"]
            for rid in ("ra", "rb"):
                assert len(await store.read_events(rid)) == 100
                assert len(await store.load_outputs(rid)) == 100
    finally:
        await a.close()
        await b.close()


async def test_another_process_writes_the_same_file(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    store = SqliteStore(path)
    await store.create_run(RunRecord(run_id="parent", graph="g"))
    await store.create_run(RunRecord(run_id="child", graph="g"))
    child = textwrap.dedent(
        f"""
        import anyio
        from treadle.runtime.core.events import NodeFinished
        from treadle.runtime.stores.sqlite import SqliteStore

        async def main():
            store = SqliteStore({str(path)!r})
            for seq in range(1, 201):
                ev = NodeFinished(seq=seq, run_id="child", ts=1.0, node="n", duration_s=0.0)
                await store.record("child", [ev], {{f"n{{seq}}": b"1"}})
            await store.close()

        anyio.run(main)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", child], stderr=subprocess.PIPE)
    try:
        for seq in range(1, 201):
            await store.record("parent", [finished("parent", seq)], {f"n{seq}": b"1"})
        _, err = await anyio.to_thread.run_sync(proc.communicate)
        assert proc.returncode == 0, err.decode()
        assert len(await store.read_events("child")) == 200
        assert len(await store.read_events("parent")) == 200
        assert len(await store.load_outputs("child")) == 200
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        await store.close()


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    store = SqliteStore(path)
    try:
        with pytest.raises(RuntimeError, match="schema version 99"):
            await store.get_run("r")
    finally:
        await store.close()


def test_default_path_and_options() -> None:
    assert SqliteStore().path == str(DEFAULT_PATH.expanduser())  # nothing is opened yet
    with pytest.raises(ValueError):
        SqliteStore(":memory:", synchronous="OFF")


async def test_synchronous_full_and_memory_database() -> None:
    store = SqliteStore(":memory:", synchronous="FULL")
    try:
        await store.create_run(RunRecord(run_id="r", graph="g"))
        await store.record("r", [finished("r", 1)], {"a": b"1"})
        assert await store.load_outputs("r") == {"a": b"1"}
    finally:
        await store.close()


async def test_a_value_that_is_not_json_is_refused(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "runs.db")
    try:
        with pytest.raises(ValueError, match="inputs"):
            await store.create_run(RunRecord(run_id="r", graph="g", inputs={"s": {1, 2}}))
        assert await store.get_run("r") is None
    finally:
        await store.close()
