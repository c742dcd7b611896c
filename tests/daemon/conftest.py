"""Fixtures for the daemon tests (helpers: `daemon_support.py`). Everything that needs
Redis is skipped, with the reason, when `redis-server` is not installed."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from daemon_support import (
    Daemon,
    WorkerProcess,
    make_config,
    open_daemon,
)


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
