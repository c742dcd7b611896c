"""HTTP metrics of the API (requests and latency by route and status), as ASGI middleware
that records into the daemon's Prometheus registry. Routes are labelled by their template
(`/v1/runs/{run_id}`), never by the concrete path, to keep the series few."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from redis.exceptions import RedisError, ResponseError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from treadle.runtime.daemon.services import Services

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class HttpMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "treadle_http_requests",
            "HTTP requests served, by method, route and status.",
            ["method", "route", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "treadle_http_request_duration_seconds",
            "Time to the response's first byte, by method and route.",
            ["method", "route"],
            buckets=_BUCKETS,
            registry=registry,
        )


class HttpMetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: HttpMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                route = scope.get("route")
                template = getattr(route, "path", "(unmatched)")
                self.metrics.latency.labels(scope["method"], template).observe(
                    time.perf_counter() - started
                )
                self.metrics.requests.labels(scope["method"], template, str(status)).inc()
            await send(message)

        await self.app(scope, receive, send_wrapper)


class ApiMetrics:
    """The API process's Prometheus registry: run metrics (`RuntimeMetrics`, fed by an
    in-process worker), HTTP metrics, and work-queue gauges read from Redis per scrape."""

    def __init__(self) -> None:
        from treadle.runtime.observe.metrics import RuntimeMetrics

        self.metrics = RuntimeMetrics()
        self.http = HttpMetrics(self.metrics.registry)
        self._queued = self.metrics.gauge(
            "treadle_queue_entries", "Runs in the work queue (queued or being worked on)."
        )
        self._claimed = self.metrics.gauge(
            "treadle_queue_claimed", "Queue entries claimed by a worker and not yet done."
        )

    async def refresh(self, services: Services) -> None:
        queue = services.queue
        try:
            entries = await services.redis.xlen(queue.keys.queue())
            pending: Any = await services.redis.xpending(queue.keys.queue(), queue.group)
        except ResponseError:  # no queue or group yet
            entries, pending = 0, {"pending": 0}
        except (RedisError, OSError):
            return  # the other series are still worth serving
        self._queued.set(entries)
        self._claimed.set(int(pending.get("pending", 0)) if isinstance(pending, dict) else 0)
