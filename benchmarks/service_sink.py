"""The service benchmark's one tool with a side effect: `merge` joins two texts and records
the idempotency key it was called with and a digest of its inputs, one line per call, in
the file named by `$TREADLE_BENCH_SINK` (appended with one write, so lines of concurrent
and killed workers never interleave). A node re-executed after a worker died calls it
again; the benchmark then checks, from this file, that every call with the same inputs (one
node execution) carried the same key, which is what lets the service on the other side drop
the repeat."""

from __future__ import annotations

import hashlib
import os

from treadle.tools import tool

SINK_ENV = "TREADLE_BENCH_SINK"


@tool(name="merge", idempotent=False, expected_duration_s=0.0001)
async def merge(a: str, b: str, idempotency_key: str | None = None) -> str:
    """Join two parts of a text (and record the call's idempotency key).

    Args:
        a: The first part.
        b: The second part.
    """
    path = os.environ.get(SINK_ENV)
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            digest = hashlib.sha256(f"{a}\0{b}".encode()).hexdigest()[:16]
            os.write(fd, f"{idempotency_key or '-'}\t{digest}\n".encode())
        finally:
            os.close(fd)
    return f"{a}\n{b}"
