"""Fixtures of the runtime tests: `store`, each of memory, sqlite and Redis in turn (the
Redis one on the private server of `tests/conftest.py`), and `store_factory`, which opens
another store on the same data (what a second process would see)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from runtime_support import StoreFactory

from treadle.runtime.core.store import StateStore
from treadle.runtime.stores.memory import MemoryStore
from treadle.runtime.stores.redis import RedisStore
from treadle.runtime.stores.sqlite import SqliteStore


@pytest.fixture(params=["memory", "sqlite", "redis"])
def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    if request.param == "memory":
        shared = MemoryStore()
        return lambda: shared
    if request.param == "sqlite":
        return lambda: SqliteStore(tmp_path / "runs.db")
    url = request.getfixturevalue("redis_url")
    return lambda: RedisStore(url)


@pytest.fixture
async def store(store_factory: StoreFactory) -> AsyncIterator[StateStore]:
    s = store_factory()
    try:
        yield s
    finally:
        await s.close()
