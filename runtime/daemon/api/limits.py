"""Per-tenant limits at the API, so that one tenant's traffic cannot crowd out another's:
a request rate (a token bucket: `tenant_rate_per_s` on average, `tenant_rate_burst` at
once), requests in progress (`tenant_max_in_flight`), and event streams
(`max_event_streams_per_tenant`, under the process's `max_event_streams`).

A tenant over its own limit gets 429 with `Retry-After`; only the process-wide stream cap
(every tenant together) answers 503. The counts live in the API process: they bound what
one tenant takes of *this* process (several API processes each allow as much). Checking
costs no round trip to Redis. A request counts as in progress from its authentication to
the end of its response: `InFlightMiddleware` gives the count back (cheaper than a
dependency with `yield`, which FastAPI runs through an exit stack).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from treadle.runtime.daemon.api.errors import ApiError
from treadle.runtime.daemon.config import DaemonConfig

_IN_FLIGHT = "treadle.in_flight_tenant"


@dataclass
class _Bucket:
    tokens: float
    updated: float


class TenantLimits:
    def __init__(self, config: DaemonConfig) -> None:
        self.rate = config.tenant_rate_per_s
        self.burst = config.tenant_rate_burst
        self.max_in_flight = config.tenant_max_in_flight
        self.max_streams = config.max_event_streams
        self.max_streams_per_tenant = config.max_event_streams_per_tenant
        self._buckets: dict[str, _Bucket] = {}
        #: API key id -> its tenant, learned when the key authenticated (keys that did)
        self._key_tenants: dict[str, str] = {}
        self._in_flight: dict[str, int] = {}
        self._streams: dict[str, int] = {}
        self.open_streams = 0

    def precheck(self, key_id: str) -> None:
        """Before authenticating: 429 at once when the key belongs to a tenant whose bucket
        is empty, so a tenant's burst past its rate costs no round trip to Redis. (A key
        not seen yet goes on to be authenticated.)"""
        tenant = self._key_tenants.get(key_id)
        if tenant is not None and self.rate > 0:
            self._take(tenant, time.monotonic(), take=False)

    def admit(self, tenant: str, key_id: str | None = None, now: float | None = None) -> None:
        """Take one request from the tenant's bucket; 429 `rate_limited` when it is empty."""
        if key_id is not None:
            self._key_tenants[key_id] = tenant
        if self.rate > 0:
            self._take(tenant, time.monotonic() if now is None else now, take=True)

    def _take(self, tenant: str, now: float, *, take: bool) -> None:
        bucket = self._buckets.get(tenant)
        if bucket is None:
            bucket = self._buckets[tenant] = _Bucket(float(self.burst), now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        if bucket.tokens < 1.0:
            wait_s = max(1, math.ceil((1.0 - bucket.tokens) / self.rate))
            raise ApiError(
                429,
                f"too many requests: this tenant may make {self.rate:g} requests per second "
                f"(bursts of {self.burst}); retry in {wait_s} s",
                code="rate_limited",
                headers={"Retry-After": str(wait_s)},
            )
        if take:
            bucket.tokens -= 1.0

    def enter(self, tenant: str, scope: Scope) -> None:
        """Count the request in progress until its response has gone (`InFlightMiddleware`
        gives it back); 429 when the tenant has too many."""
        count = self._in_flight.get(tenant, 0)
        if count >= self.max_in_flight:
            raise ApiError(
                429,
                f"too many requests in progress: this tenant may have {self.max_in_flight} at "
                "once; retry when one has finished",
                code="rate_limited",
                headers={"Retry-After": "1"},
            )
        self._in_flight[tenant] = count + 1
        scope.setdefault("state", {})[_IN_FLIGHT] = tenant

    def leave(self, scope: Scope) -> None:
        tenant = scope.get("state", {}).pop(_IN_FLIGHT, None)
        if tenant is not None:
            _decrement(self._in_flight, tenant)

    def open_stream(self, tenant: str) -> Callable[[], None]:
        """Count an event stream; returns its release (safe to call more than once)."""
        held = self._streams.get(tenant, 0)
        if held >= self.max_streams_per_tenant:
            raise ApiError(
                429,
                f"too many event streams: this tenant may hold {self.max_streams_per_tenant} "
                "open at once; close one (or retry shortly)",
                code="rate_limited",
                headers={"Retry-After": "5"},
            )
        if self.open_streams >= self.max_streams:
            raise ApiError(
                503, "too many event streams are open; retry shortly", headers={"Retry-After": "5"}
            )
        self._streams[tenant] = held + 1
        self.open_streams += 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self.open_streams -= 1
            _decrement(self._streams, tenant)

        return release


def _decrement(counts: dict[str, int], tenant: str) -> None:
    """One fewer; a tenant at zero leaves the table (it holds only tenants in action)."""
    left = counts[tenant] - 1
    if left:
        counts[tenant] = left
    else:
        del counts[tenant]


class InFlightMiddleware:
    """Gives a request's in-progress count back once its response has gone."""

    def __init__(self, app: ASGIApp, limits: TenantLimits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        finally:
            if scope["type"] == "http":
                self.limits.leave(scope)
