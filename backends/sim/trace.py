"""Request traces for the simulator: the Mooncake and Azure formats, and a replay loop.

- Mooncake (`conversation_trace.jsonl`): one JSON object a line, `timestamp` (ms),
  `input_length`, `output_length`, `hash_ids` (one id per 512-token block; equal ids = equal
  content). Prompts become `Prompt.from_block_keys(hash_ids, input_length, 512)`.
- Azure LLM inference 2023 (CSV `TIMESTAMP, ContextTokens, GeneratedTokens`): no content
  information, so every prompt is `Prompt.anonymous(n)` (never shared).

`replay` runs a trace through a set of engines on one shared `VirtualClock`: each row
arrives at `timestamp / rate_scale` and goes to the engine `route` picks.

Public API (stable):

    TraceRow(arrival_s, input_length, output_length, hash_ids=None)
    load_mooncake(path, limit=None) -> list[TraceRow]
    load_azure(path, limit=None) -> list[TraceRow]
    row.prompt(block_size=16) -> Prompt;  row.request(**kw) -> SimRequest
    replay(rows, engines, route=round_robin(), *, rate_scale=1.0, clock=None)
        -> list[SimRequest]                # in row order, all finished
    round_robin() -> Route;  Route = Callable[[SimRequest, Sequence[Engine]], Engine]
"""

from __future__ import annotations

import csv
import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from treadle.backends.sim.blocks import Prompt
from treadle.backends.sim.clock import VirtualClock
from treadle.backends.sim.engine import Engine, SimRequest

MOONCAKE_BLOCK_TOKENS = 512

Route = Callable[[SimRequest, Sequence[Engine]], Engine]


@dataclass(frozen=True, slots=True)
class TraceRow:
    """One request of a trace; `hash_ids` is None when the trace has no content ids."""

    arrival_s: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...] | None = None

    def prompt(self, block_size: int = 16) -> Prompt:
        if self.hash_ids is None:
            return Prompt.anonymous(self.input_length, block_size)
        return Prompt.from_block_keys(
            self.hash_ids, self.input_length, MOONCAKE_BLOCK_TOKENS, block_size
        )

    def request(self, block_size: int = 16, **kwargs: Any) -> SimRequest:
        return SimRequest(self.prompt(block_size), max(1, self.output_length), **kwargs)


def load_mooncake(path: str | Path, limit: int | None = None) -> list[TraceRow]:
    rows: list[TraceRow] = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                rows.append(
                    TraceRow(
                        arrival_s=float(obj["timestamp"]) / 1000.0,
                        input_length=int(obj["input_length"]),
                        output_length=int(obj["output_length"]),
                        hash_ids=tuple(int(h) for h in obj["hash_ids"]),
                    )
                )
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{lineno}: not a Mooncake trace row: {exc}") from exc
            if limit is not None and len(rows) >= limit:
                break
    return rows


def load_azure(path: str | Path, limit: int | None = None) -> list[TraceRow]:
    rows: list[TraceRow] = []
    t0: datetime | None = None
    with open(path, newline="") as f:
        for lineno, rec in enumerate(csv.DictReader(f), 2):
            try:
                stamp = datetime.fromisoformat(rec["TIMESTAMP"].strip()[:26])
                t0 = t0 or stamp
                rows.append(
                    TraceRow(
                        arrival_s=(stamp - t0).total_seconds(),
                        input_length=int(rec["ContextTokens"]),
                        output_length=int(rec["GeneratedTokens"]),
                    )
                )
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{lineno}: not an Azure trace row: {exc}") from exc
            if limit is not None and len(rows) >= limit:
                break
    return rows


def round_robin() -> Route:
    counter = itertools.count()

    def route(request: SimRequest, engines: Sequence[Engine]) -> Engine:
        return engines[next(counter) % len(engines)]

    return route


def replay(
    rows: Sequence[TraceRow],
    engines: Sequence[Engine],
    route: Route | None = None,
    *,
    rate_scale: float = 1.0,
    clock: VirtualClock | None = None,
) -> list[SimRequest]:
    """Replay `rows` (arrivals compressed by `rate_scale`) and run until all finish.

    The engines must share `clock` (default: the first engine's clock, which must be a
    `VirtualClock`). Returns the requests in row order.
    """
    if not engines:
        raise ValueError("replay needs at least one engine")
    if rate_scale <= 0:
        raise ValueError("rate_scale must be > 0")
    clk = clock if clock is not None else engines[0].clock
    if not isinstance(clk, VirtualClock):
        raise TypeError("replay needs engines on a VirtualClock")
    if any(e.clock is not clk for e in engines):
        raise ValueError("all engines must share the replay clock")
    pick = route or round_robin()
    block_size = engines[0].block_size
    requests = [row.request(block_size, request_id=f"trace-{i}") for i, row in enumerate(rows)]
    it = iter(zip(rows, requests, strict=True))
    start = clk.now()

    # Arrivals are fed one at a time so the event heap stays small.
    def arrive(req: SimRequest) -> None:
        pick(req, engines).submit(req)
        feed()

    def feed() -> None:
        nxt = next(it, None)
        if nxt is not None:
            row, req = nxt
            clk.schedule(start + row.arrival_s / rate_scale, lambda: arrive(req))

    feed()
    clk.run()
    return requests
