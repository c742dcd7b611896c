"""Fixtures for the tests against a real engine: llama.cpp's `llama-server` (built from the
pinned sdist, see `treadle.testing.llamacpp`) serving the tiny random-weight model.

Without the binary these tests are skipped, saying how to build it, unless
`TREADLE_REQUIRE_REALENGINE=1` (CI sets it, after building the binary once), which turns
the skip into a failure: a real-engine test never silently stops running in CI.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from realengine_support import StartServers

from treadle.testing.llamacpp import (
    LlamaServer,
    LlamaServers,
    LlamaServerUnavailable,
    find_llama_server,
)
from treadle.testing.tiny_gguf import write_tiny_gguf

REQUIRE_ENV = "TREADLE_REQUIRE_REALENGINE"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.realengine)


@pytest.fixture(scope="session")
def llama_server_binary() -> Path:
    try:
        binary = find_llama_server()
    except LlamaServerUnavailable as exc:
        binary, why = None, str(exc)
    else:
        why = (
            "no llama-server binary: build it once with `python -m treadle.testing.llamacpp "
            "build` (about 10 minutes on 2 cores; cached) or set TREADLE_LLAMA_SERVER"
        )
    if binary is None:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but {why}")
        pytest.skip(why)
    return binary


@pytest.fixture(autouse=True)
def _needs_llama_server(llama_server_binary: Path) -> None:
    """Every test here needs the binary, also those that start servers by themselves:
    without it they skip (or fail under TREADLE_REQUIRE_REALENGINE=1)."""


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("model") / "tiny.gguf")


@pytest.fixture
def start_servers(
    llama_server_binary: Path, tiny_model: Path, tmp_path: Path
) -> Iterator[StartServers]:
    """`start_servers(n, **LlamaServer options)`: n servers of the tiny model, stopped (by
    PID) when the test ends."""
    started: list[LlamaServers] = []

    def start(n: int = 1, **options: object) -> LlamaServers:
        servers = LlamaServers.start(
            n,
            tiny_model,
            tmp_path / f"servers-{len(started)}",
            binary=llama_server_binary,
            **options,
        )
        started.append(servers)
        return servers

    yield start
    for servers in started:
        servers.stop()


@pytest.fixture
def llama_server(start_servers: StartServers) -> LlamaServer:
    """One server, 4 slots of 4096 tokens."""
    return start_servers(1)[0]
