"""Fixtures for the daemon tests (helpers: `daemon_support.py`). Everything that needs
Redis is skipped, with the reason, when `redis-server` is not installed."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from daemon_support import (
    REDIS_BINARY,
    SKIP_REASON,
    Daemon,
    RedisServer,
    WorkerProcess,
    make_config,
    open_daemon,
)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if REDIS_BINARY is None:
        pytest.skip(SKIP_REASON)
    server = RedisServer(tmp_path_factory.mktemp("daemon-redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: Any) -> str:
    """The session server, emptied for this test."""
    client = redis.Redis(port=redis_server.port)
    try:
        client.flushall()
    finally:
        client.close()
    return str(redis_server.url)


@pytest.fixture
def aof_redis(tmp_path: Path) -> Iterator[Any]:
    """A server of this test's own with appendonly/appendfsync always (kill + restart)."""
    server = RedisServer(tmp_path / "redis-aof", appendonly=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def daemon(redis_url: str) -> AsyncIterator[Daemon]:
    """The app with one in-process worker."""
    async for d in open_daemon(make_config(redis_url), workers=1):
        yield d


@pytest.fixture
async def api_only(redis_url: str) -> AsyncIterator[Daemon]:
    """The app without workers: runs stay queued."""
    async for d in open_daemon(make_config(redis_url), workers=0):
        yield d


@pytest.fixture
def worker_processes() -> Iterator[list[WorkerProcess]]:
    """A list the test fills; every process in it is killed at the end."""
    procs: list[WorkerProcess] = []
    try:
        yield procs
    finally:
        for proc in procs:
            proc.kill()
