"""A small synchronous client of the daemon's HTTP API (what `treadle remote ...` uses).
Errors come back as `ClientError` with the API's status, code and message.

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
from httpx_sse import EventSource
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from treadle.errors import DaemonError
from treadle.runtime.core.store import TERMINAL

#: statuses `wait` returns at: the run is over, or waits for a person (`answer`)
SETTLED = TERMINAL | {"waiting"}
#: the length of the run ids the daemon gives (uuid4 hex)
FULL_ID_LENGTH = 32
#: dropped connections in a row, without an event in between, that `events()` survives
_RECONNECTS = 10


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

    def workflows(self) -> Any:
        return self._json("GET", "/v1/workflows")

    def versions(self, name: str) -> Any:
        return self._json("GET", f"/v1/workflows/{name}/versions")

    def workflow(self, name: str, version: int | None = None) -> Any:
        path = f"/v1/workflows/{name}" + (f"/versions/{version}" if version else "")
        return self._json("GET", path)

    def submit(
        self,
        workflow: str,
        inputs: Mapping[str, Any] | None = None,
        *,
        version: int | None = None,
        traceparent: str | None = None,
    ) -> Any:
        headers = {"traceparent": traceparent} if traceparent else {}
        body: dict[str, Any] = {"workflow": workflow, "inputs": dict(inputs or {})}
        if version is not None:
            body["version"] = version
        return self._json("POST", "/v1/runs", json=body, headers=headers)

    def answer(
        self, run_id: str, value: Any, *, node: str | None = None, key: str | None = None
    ) -> Any:
        """Answer a waiting run's request for input (idempotent on `key`)."""
        body = {"value": value, "node": node, "key": key}
        return self._json("POST", f"/v1/runs/{run_id}/input", json=body)

    def get_run(self, run_id: str) -> Any:
        return self._json("GET", f"/v1/runs/{run_id}")

    def runs(
        self,
        *,
        status: str | None = None,
        workflow: str | None = None,
        id_prefix: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> Any:
        """One page of the tenant's runs, newest first (`next_cursor` goes on)."""
        given = {"status": status, "workflow": workflow, "id_prefix": id_prefix,
                 "limit": limit, "cursor": cursor}  # fmt: skip
        return self._json("GET", "/v1/runs", params={k: v for k, v in given.items() if v})

    def resolve(self, run_id: str) -> str:
        """The full id of the one run whose id is or starts with `run_id` (daemon ids are
        32 hex digits: one that long is taken as it is). Raises `ClientError` 404 when no
        run matches, 409 when several do (naming a few)."""
        if len(run_id) == FULL_ID_LENGTH:
            return run_id
        found = [r["run_id"] for r in self.runs(id_prefix=run_id, limit=5)["runs"]]
        if run_id in found or len(found) == 1:
            return run_id if run_id in found else found[0]
        if not found:
            raise ClientError(404, "not_found", f"no run's id starts with {run_id!r}")
        more = ", ".join(found) + (", …" if len(found) == 5 else "")
        raise ClientError(409, "ambiguous", f"{run_id!r} starts several run ids: {more}")

    def cancel(self, run_id: str) -> Any:
        return self._json("POST", f"/v1/runs/{run_id}/cancel")

    def wait(self, run_id: str, *, poll_s: float = 0.2, timeout_s: float | None = None) -> Any:
        """The run once it has finished or waits for input."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            run = self.get_run(run_id)
            if run["status"] in SETTLED:
                return run
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id} is still {run['status']}")
            time.sleep(poll_s)

    def events(self, run_id: str, *, after: int = 0, follow: bool = True) -> Iterator[Any]:
        """The run's events (dicts, in seq order) from seq `after` on. A dropped connection
        is reconnected from the last seq seen, at once after it delivered events, else with
        backoff; `_RECONNECTS` failures in a row without an event raise."""
        last = after
        done = False
        while not done:
            delivered = broke = False
            reconnects = Retrying(
                retry=retry_if_exception_type(httpx.TransportError),
                stop=stop_after_attempt(_RECONNECTS + 1),
                wait=wait_exponential(multiplier=0.4, max=5.0),
                reraise=True,
            )
            for attempt in reconnects:
                with attempt:
                    try:
                        for seq, data in self._stream(run_id, last, follow):
                            delivered = True
                            last = seq
                            yield data
                    except httpx.TransportError:
                        if not delivered:
                            raise  # tenacity waits and tries again
                        broke = True  # after events: reconnect now, with a fresh budget
                    # a stream the server ended early (a restart, a Redis blip) resumes
                    done = not broke and (not follow or self.get_run(run_id)["status"] in TERMINAL)

    def _stream(self, run_id: str, after: int, follow: bool) -> Iterator[tuple[int, Any]]:
        params = {"follow": "true" if follow else "false"}
        headers = {"Last-Event-ID": str(after), "Accept": "text/event-stream"}
        with self._http.stream(
            "GET", f"/v1/runs/{run_id}/events", params=params, headers=headers
        ) as resp:
            if resp.status_code != 200:
                resp.read()
                raise _error(resp)
            for sse in EventSource(resp).iter_sse():
                # every event of the API has an id (its seq) and JSON data; the `retry:`
                # advice it starts with has neither
                if sse.data and sse.id:
                    yield int(sse.id), json.loads(sse.data)

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
