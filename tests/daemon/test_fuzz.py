"""Fuzz the whole OpenAPI document (schemathesis, every check: no 5xx, every status and
header documented, response bodies as their schemas say, positive and negative data, auth,
unsupported methods; and stateful sequences that follow the document's links) against a
live server; every error is the API's JSON error body. `schemathesis.toml` (at the repo
root) says which refusals of schema-valid data are the server's to judge."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest
import redis
from daemon_support import FIVE, REPO, LiveServer, make_config

from treadle.runtime.daemon.api.app import create_app
from treadle.runtime.daemon.config import DaemonConfig
from treadle.runtime.daemon.services import Services

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402  (after the skip)
from hypothesis import strategies as st  # noqa: E402

schema = schemathesis.openapi.from_dict(create_app(DaemonConfig()).openapi())
RESEARCH = (REPO / "examples" / "research.yaml").read_text()


async def _setup(config: DaemonConfig) -> dict[str, str]:
    services = Services.open(config)
    try:
        await services.tenants.create("fuzz", max_concurrent_runs=100_000)
        key = (await services.tenants.issue_key("fuzz")).token
        await services.registry.register("fuzz", FIVE, "yaml")
        # the README's example: the schema's example submission names it
        await services.registry.register("fuzz", RESEARCH, "yaml")
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
    # /metrics as in production (a token), the examples' module allowed, no request rate
    # limit (the fuzzing is one tenant's thousands of requests)
    config = make_config(
        redis_server.url,
        metrics_public=False,
        metrics_token="metrics-s3cret",
        allow_imports=("treadle.examples",),
        tenant_rate_per_s=0,
    )
    headers = anyio.run(_setup, config)
    with LiveServer(create_app(config, workers=1)) as server:
        yield server.url, headers


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_gets_a_server_error(case: Any, fuzz_target: tuple[str, dict[str, str]]) -> None:
    url, auth = fuzz_target
    # the tenant's key replaces a generated Authorization header, so that the fuzzing gets
    # past authentication (which test_api.py attacks on its own)
    headers = {**(case.headers or {}), **auth}
    response = case.call_and_validate(base_url=url, headers=headers, timeout=10)
    if response.status_code >= 400:
        assert response.headers["content-type"][0].startswith("application/json")
        error = response.json()["error"]
        assert error["code"] and error["message"]


def test_stateful_sequences_follow_the_links(fuzz_target: tuple[str, dict[str, str]]) -> None:
    url, auth = fuzz_target

    class Workflow(schema.as_state_machine()):  # type: ignore[misc]
        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            return {"base_url": url, "headers": {**(case.headers or {}), **auth}, "timeout": 10}

    Workflow.run(
        settings=settings(
            max_examples=15,
            stateful_step_count=6,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )
    )


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(inputs=st.dictionaries(st.sampled_from(["topic", "x", ""]), JSON, max_size=3))
def test_submitting_fuzzed_inputs(
    inputs: dict[str, Any], fuzz_target: tuple[str, dict[str, str]]
) -> None:
    url, auth = fuzz_target
    body = {"workflow": "five", "inputs": inputs}
    resp = httpx.post(f"{url}/v1/runs", json=body, headers=auth, timeout=10)
    valid = set(inputs) == {"topic"} and isinstance(inputs["topic"], str)
    assert resp.status_code == (201 if valid else 422), resp.text


@st.composite
def mutated_definitions(draw: st.DrawFn) -> str:
    """FIVE with a few characters inserted, deleted or replaced: mostly broken YAML."""
    text = FIVE
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(text) - 1))
        what = draw(st.sampled_from(["insert", "delete", "replace"]))
        char = draw(st.sampled_from(list(":{}[]$'\"-#&*!|> \n\tx0")))
        if what == "insert":
            text = text[:at] + char + text[at:]
        elif what == "delete":
            text = text[:at] + text[at + 1 :]
        else:
            text = text[:at] + char + text[at + 1 :]
    return text


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(definition=mutated_definitions() | st.text(max_size=200))
def test_registering_fuzzed_definitions(
    definition: str, fuzz_target: tuple[str, dict[str, str]]
) -> None:
    url, auth = fuzz_target
    resp = httpx.post(
        f"{url}/v1/workflows", json={"definition": definition}, headers=auth, timeout=10
    )
    assert resp.status_code in (201, 422), resp.text
    if resp.status_code == 422:
        assert resp.json()["error"]["code"] in ("invalid_workflow", "invalid_request")
