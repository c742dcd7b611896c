"""Fuzz every API operation from its OpenAPI schema (schemathesis, positive and negative
cases) against a live server: no request, however malformed, gets a 5xx, and every error is
the API's JSON error body."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anyio
import pytest
import redis
from daemon_support import FIVE, LiveServer, make_config

from treadle.daemon.app import create_app
from treadle.daemon.config import DaemonConfig
from treadle.daemon.services import Services

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402  (after the skip)
from schemathesis.checks import not_a_server_error  # noqa: E402

schema = schemathesis.openapi.from_dict(create_app(DaemonConfig()).openapi())


async def _setup(config: DaemonConfig) -> dict[str, str]:
    services = Services.open(config)
    try:
        await services.tenants.create("fuzz", max_concurrent_runs=100_000)
        key = (await services.tenants.issue_key("fuzz")).token
        await services.registry.register("fuzz", FIVE, "yaml")
        return {"Authorization": f"Bearer {key}"}
    finally:
        await services.close()


@pytest.fixture(scope="module")
def fuzz_target(redis_server: Any) -> Iterator[tuple[str, dict[str, str]]]:
    """A live server with a worker, a tenant and one registered workflow, for the module."""
    client = redis.Redis(port=redis_server.port)
    try:
        client.flushall()
    finally:
        client.close()
    config = make_config(redis_server.url)
    headers = anyio.run(_setup, config)
    with LiveServer(create_app(config, workers=1)) as server:
        yield server.url, headers


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_gets_a_server_error(case: Any, fuzz_target: tuple[str, dict[str, str]]) -> None:
    url, auth = fuzz_target
    # the caller's own headers (a generated Authorization) win; without one, the tenant's
    headers = {**auth, **(case.headers or {})}
    response = case.call_and_validate(
        base_url=url, headers=headers, checks=[not_a_server_error], timeout=10
    )
    import collections, atexit
    _C = globals().setdefault("_C", collections.Counter())
    if not _C: atexit.register(lambda: print("\nCOUNTS", sorted(_C.items())))
    _C[(case.method, case.path, response.status_code)] += 1
    if response.status_code >= 400:
        assert response.headers["content-type"][0].startswith("application/json")
        error = response.json()["error"]
        assert error["code"] and error["message"]
