"""A small synchronous client of the daemon's HTTP API (what `treadle submit`, `status` and
`logs` use). Errors come back as `ClientError` with the API's status, code and message.

`events()` follows a run's Server-Sent Events and survives dropped connections: it
reconnects with `Last-Event-ID` (the last seq it saw) until the run is terminal, so no
event is lost or repeated.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from typing import Any

import httpx

from treadle.errors import DaemonError
from treadle.runtime.core.store import TERMINAL


class ClientError(DaemonError):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class DaemonClient:
    def __init__(self, url: str, api_key: str, *, timeout_s: float = 30.0) -> None:
        if not url:
            raise ValueError("the daemon's URL is required (--url or TREADLE_URL)")
        if not api_key:
            raise ValueError("an API key is required (--key or TREADLE_API_KEY)")
        self._http = httpx.Client(
            base_url=url.rstrip("/"),
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=httpx.Timeout(timeout_s, read=None),
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> DaemonClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- calls -------------------------------------------------------------------------

    def register(self, definition: str, fmt: str = "yaml", filename: str | None = None) -> Any:
        body = {"definition": definition, "format": fmt, "filename": filename}
        return self._json("POST", "/v1/workflows", json=body)

    def submit(
        self,
        workflow: str,
        inputs: Mapping[str, Any] | None = None,
        *,
        traceparent: str | None = None,
    ) -> Any:
        headers = {"traceparent": traceparent} if traceparent else {}
        body = {"workflow": workflow, "inputs": dict(inputs or {})}
        return self._json("POST", "/v1/runs", json=body, headers=headers)

    def get_run(self, run_id: str) -> Any:
        return self._json("GET", f"/v1/runs/{run_id}")

    def cancel(self, run_id: str) -> Any:
        return self._json("POST", f"/v1/runs/{run_id}/cancel")

    def wait(self, run_id: str, *, poll_s: float = 0.2, timeout_s: float | None = None) -> Any:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            run = self.get_run(run_id)
            if run["status"] in TERMINAL:
                return run
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id} is still {run['status']}")
            time.sleep(poll_s)

    def events(self, run_id: str, *, after: int = 0, follow: bool = True) -> Iterator[Any]:
        """The run's events (dicts, in seq order) from seq `after` on."""
        last = after
        failures = 0
        while True:
            try:
                for seq, data in self._stream(run_id, last, follow):
                    failures = 0
                    last = seq
                    yield data
            except httpx.TransportError:
                failures += 1
                if failures > 10:
                    raise
                time.sleep(min(0.2 * 2**failures, 5.0))
                continue
            if not follow or self.get_run(run_id)["status"] in TERMINAL:
                return
            # the server ended the stream early (restart, Redis blip): resume where we were

    def _stream(self, run_id: str, after: int, follow: bool) -> Iterator[tuple[int, Any]]:
        params = {"follow": "true" if follow else "false"}
        headers = {"Last-Event-ID": str(after), "Accept": "text/event-stream"}
        with self._http.stream(
            "GET", f"/v1/runs/{run_id}/events", params=params, headers=headers
        ) as resp:
            if resp.status_code != 200:
                resp.read()
                raise _error(resp)
            event_id: str | None = None
            data: list[str] = []
            for line in resp.iter_lines():
                if line == "":
                    if data and event_id is not None:
                        yield int(event_id), json.loads("\n".join(data))
                    event_id, data = None, []
                elif line.startswith(":"):
                    continue
                else:
                    name, _, value = line.partition(":")
                    value = value[1:] if value.startswith(" ") else value
                    if name == "id":
                        event_id = value
                    elif name == "data":
                        data.append(value)

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        resp = self._http.request(method, path, **kwargs)
        if resp.status_code >= 400:
            raise _error(resp)
        return resp.json()


def _error(resp: httpx.Response) -> ClientError:
    try:
        err = resp.json()["error"]
        return ClientError(resp.status_code, str(err["code"]), str(err["message"]))
    except (ValueError, KeyError, TypeError):
        return ClientError(resp.status_code, "error", resp.text[:500] or resp.reason_phrase)
