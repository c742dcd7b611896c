"""Functions that test workflows call (`kind: func, fn: 'gates:held'`): each waits until
the test opens its gate, so a test can look at a run while one of its nodes is running,
with no timing involved. A thread-safe flag, because the daemon under test may run on
another thread's event loop (`LiveServer`)."""

from __future__ import annotations

import threading

import anyio

_GATES: dict[str, threading.Event] = {}
_LOCK = threading.Lock()


def gate(name: str) -> threading.Event:
    with _LOCK:
        return _GATES.setdefault(name, threading.Event())


async def held(name: str, after: str = "") -> str:
    """Return once `gate(name)` is set (`after`: an input that orders it after a node)."""
    flag = gate(name)
    while not flag.is_set():
        await anyio.sleep(0.01)
    return f"released {name}"
