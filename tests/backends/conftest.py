"""Fixtures for the HTTP backends' tests: a real OpenAI-compatible server on a free port."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fake_openai_server import FakeState, RunningServer, create_fake_app, free_port, serve_in_thread


@pytest.fixture(scope="session")
def fake_server() -> Iterator[RunningServer]:
    state = FakeState()
    with serve_in_thread(create_fake_app(state)) as url:
        yield RunningServer(url=url, state=state)


@pytest.fixture
def closed_port_url() -> str:
    """A URL nothing listens on."""
    return f"http://127.0.0.1:{free_port()}/v1"
