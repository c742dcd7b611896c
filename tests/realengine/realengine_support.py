"""Types shared by the real-engine tests and their fixtures (a module of its own: test
modules must not import `conftest`, whose name every test folder shares)."""

from __future__ import annotations

from collections.abc import Callable

from treadle.testing.llamacpp import LlamaServers

#: the `start_servers` fixture: `start_servers(n, **LlamaServer options)`
StartServers = Callable[..., LlamaServers]
