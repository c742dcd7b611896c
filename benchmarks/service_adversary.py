"""`treadle bench service --adversary`: one hostile tenant beside the normal ones.

For the length of its phase the adversary, within fixed bounds and on loopback only:

- bursts past its quotas: for the first half of the phase, submits long runs at
  `burst_rate` (above its request rate, and its active-run quota soon holds);
- holds every event stream it may, and asks for more;
- runs the catastrophic regex: a scripted rule `(a+)+$` on 40 a's and a b (exponential
  time under a backtracking engine, linear under RE2);
- half-sends connections: `half_open` sockets that send part of a request's head and
  then nothing, opened again as the server closes them;
- tries reads outside its root: `read_file` on the operator's files, another tenant's
  directory, absolute paths.

What it gets is counted by status (`refusals`); its reads that succeeded, and its regex
runs that did not finish, are the failures the benchmark reports. It runs as a process of
its own (`python -m treadle.benchmarks.service_adversary`, its report as JSON on stdout),
so that its work does not delay the load generator's requests, whose latency is measured.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx

from treadle.benchmarks.service_load import CONNECTION_ERRORS, Connection

#: long runs: each holds one of the adversary's active-run slots for seconds
HOLD = """\
name: hold
inputs:
  topic: str
models:
  default: {backend: scripted, latency_s: 3.0}
nodes:
  - {id: a, kind: llm, prompt: "Hold {t}", inputs: {t: $input.topic}}
outputs:
  a: $a
"""

REGEX = """\
name: regex
inputs:
  text: str
models:
  default:
    backend: scripted
    rules: [{match: "(a+)+$", content: "matched"}]
nodes:
  - {id: a, kind: llm, prompt: "{t}", inputs: {t: $input.text}}
outputs:
  a: $a
"""

READER = """\
name: reader
inputs:
  path: str
nodes:
  - {id: read, kind: tool, tool: read_file, inputs: {path: $input.path}}
outputs:
  text: $read
"""

TERMINAL = ("succeeded", "failed", "cancelled")


@dataclass
class AdversaryReport:
    refusals: Counter[int] = field(default_factory=Counter)
    accepted: int = 0
    streams_held: int = 0
    half_open_sent: int = 0
    half_open_closed_by_server: int = 0
    regex_runs: list[str] = field(default_factory=list)
    reads: list[tuple[str, str]] = field(default_factory=list)  # (run id, path)
    client_errors: int = 0

    def summary(self, outcomes: dict[str, dict[str, Any]]) -> dict[str, Any]:
        reads_allowed = [
            path for run_id, path in self.reads if outcomes[run_id].get("status") == "succeeded"
        ]
        return {
            "adversary_refusals": {str(k): v for k, v in sorted(self.refusals.items())},
            "adversary_accepted_runs": self.accepted,
            "adversary_streams_held": self.streams_held,
            "adversary_half_open_connections": self.half_open_sent,
            "adversary_half_open_closed_by_server": self.half_open_closed_by_server,
            "regex_runs": len(self.regex_runs),
            "regex_runs_finished": sum(
                1 for r in self.regex_runs if outcomes[r].get("status") in TERMINAL
            ),
            "forbidden_reads_tried": len(self.reads),
            "forbidden_reads_allowed": len(reads_allowed),
            "forbidden_reads_allowed_paths": sorted(set(reads_allowed)),
            "adversary_client_errors": self.client_errors,
        }


class Adversary:
    def __init__(
        self,
        url: str,
        key: str,
        *,
        forbidden_paths: list[str],
        burst_rate: float = 100.0,
        streams: int = 24,
        half_open: int = 300,
    ) -> None:
        parsed = httpx.URL(url)
        self.host, self.port = parsed.host, parsed.port or 80
        self.headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
        self.forbidden_paths = forbidden_paths
        self.burst_rate = burst_rate
        self.streams = streams
        self.half_open = half_open
        self.report = AdversaryReport()

    async def setup(self) -> None:
        conn = Connection(self.host, self.port)
        try:
            for definition in (HOLD, REGEX, READER):
                body = json.dumps({"definition": definition}).encode()
                status, text = await conn.request("POST", "/v1/workflows", self.headers, body)
                if status != 201:
                    raise RuntimeError(f"the adversary's workflow: {status} {text[:300]!r}")
        finally:
            await conn.close()

    async def run(self, duration_s: float) -> None:
        """Attack for `duration_s`; the held streams and sockets are let go at the end."""
        with anyio.move_on_after(duration_s):
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._burst, duration_s / 2)
                tg.start_soon(self._hold_streams)
                tg.start_soon(self._regex)
                tg.start_soon(self._half_open)
                tg.start_soon(self._forbidden_reads)

    async def outcomes(self, timeout_s: float = 60.0) -> dict[str, dict[str, Any]]:
        """The final records of the regex and read runs (waiting for them to end)."""
        ids = [*self.report.regex_runs, *(r for r, _p in self.report.reads)]
        found: dict[str, dict[str, Any]] = {}
        conn = Connection(self.host, self.port)
        deadline = time.monotonic() + timeout_s
        try:
            for run_id in ids:
                while True:
                    status, body = await self._call(conn, "GET", f"/v1/runs/{run_id}")
                    run = json.loads(body) if status == 200 else {}
                    if run.get("status") in TERMINAL or time.monotonic() > deadline:
                        found[run_id] = run
                        break
                    if status == 429:  # its own rate limit: wait for the bucket
                        await anyio.sleep(0.5)
                    else:
                        await anyio.sleep(0.1)
        finally:
            await conn.close()
        return found

    # -- the attacks ---------------------------------------------------------------------

    async def _call(
        self, conn: Connection, method: str, target: str, body: Any = None
    ) -> tuple[int, bytes]:
        data = json.dumps(body).encode() if body is not None else b""
        try:
            return await conn.request(method, target, self.headers, data)
        except CONNECTION_ERRORS:
            self.report.client_errors += 1
            return 0, b""

    async def _submit(
        self, conn: Connection, workflow: str, inputs: dict[str, Any]
    ) -> tuple[str | None, int]:
        """(the run's id or None, the answer's status)."""
        status, body = await self._call(
            conn, "POST", "/v1/runs", {"workflow": workflow, "inputs": inputs}
        )
        if status == 201:
            self.report.accepted += 1
            run_id: str = json.loads(body)["run_id"]
            return run_id, status
        self.report.refusals[status] += 1
        return None, status

    async def _submit_patiently(
        self, conn: Connection, workflow: str, inputs: dict[str, Any]
    ) -> str | None:
        """Submit through its own rate limit: after a 429, wait a second and try again (the
        burst keeps its bucket empty; these attacks must still reach the workers)."""
        for _ in range(10):
            run_id, status = await self._submit(conn, workflow, inputs)
            if status != 429:
                return run_id
            await anyio.sleep(1.0)
        return None

    async def _burst(self, duration_s: float) -> None:
        conn = Connection(self.host, self.port)
        try:
            n = 0
            start = time.perf_counter()
            while time.perf_counter() - start < duration_s:
                n += 1
                await self._submit(conn, "hold", {"topic": f"burst {n}"})
                delay = start + n / self.burst_rate - time.perf_counter()
                if delay > 0:
                    await anyio.sleep(delay)
        finally:
            await conn.close()

    async def _hold_streams(self) -> None:
        async with httpx.AsyncClient(
            base_url=f"http://{self.host}:{self.port}", headers=self.headers, timeout=None
        ) as client:
            conn = Connection(self.host, self.port)
            run_id = None
            while run_id is None:
                run_id, _ = await self._submit(conn, "hold", {"topic": "streams"})
                if run_id is None:
                    await anyio.sleep(0.2)
            await conn.close()
            async with anyio.create_task_group() as tg:
                for _ in range(self.streams):
                    tg.start_soon(self._stream, client, run_id)
                    await anyio.sleep(0.01)

    async def _stream(self, client: httpx.AsyncClient, run_id: str) -> None:
        try:
            async with client.stream("GET", f"/v1/runs/{run_id}/events") as resp:
                if resp.status_code != 200:
                    self.report.refusals[resp.status_code] += 1
                    return
                self.report.streams_held += 1
                async for _chunk in resp.aiter_bytes():
                    pass  # held until the run ends or the phase does
        except httpx.HTTPError:
            self.report.client_errors += 1

    async def _regex(self) -> None:
        conn = Connection(self.host, self.port)
        try:
            while True:
                run_id = await self._submit_patiently(conn, "regex", {"text": "a" * 40 + "b"})
                if run_id is not None:
                    self.report.regex_runs.append(run_id)
                await anyio.sleep(0.5)
        finally:
            await conn.close()

    async def _forbidden_reads(self) -> None:
        conn = Connection(self.host, self.port)
        try:
            while True:
                for path in self.forbidden_paths:
                    run_id = await self._submit_patiently(conn, "reader", {"path": path})
                    if run_id is not None:
                        self.report.reads.append((run_id, path))
                    await anyio.sleep(0.25)
        finally:
            await conn.close()

    async def _half_open(self) -> None:
        async with anyio.create_task_group() as tg:
            for i in range(self.half_open):
                tg.start_soon(self._one_half_open, i)
                await anyio.sleep(0.002)

    async def _one_half_open(self, i: int) -> None:
        while True:
            try:
                stream = await anyio.connect_tcp(self.host, self.port)
            except OSError:
                self.report.client_errors += 1
                await anyio.sleep(1.0)
                continue
            self.report.half_open_sent += 1
            try:
                # part of a head, then silence: the server must close it
                await stream.send(b"GET /v1/tenant HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * i)
                while await stream.receive():
                    pass
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    await stream.aclose()
            self.report.half_open_closed_by_server += 1


async def attack(
    url: str, key: str, duration_s: float, forbidden_paths: list[str]
) -> dict[str, Any]:
    adversary = Adversary(url, key, forbidden_paths=forbidden_paths)
    await adversary.setup()
    await adversary.run(duration_s)
    return adversary.report.summary(await adversary.outcomes())


def main() -> None:
    """`python -m treadle.benchmarks.service_adversary URL DURATION_S PATH...` (the API key
    in `$TREADLE_API_KEY`): attack, then print the report as JSON."""
    url, duration, *paths = sys.argv[1:]
    # an attacker's client runs on its own machine: here it shares the one under test, so
    # its own CPU (not what it makes the daemon do) yields to the system's
    os.nice(10)
    report = anyio.run(attack, url, os.environ["TREADLE_API_KEY"], float(duration), paths)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
