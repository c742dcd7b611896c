"""The gateway's Prometheus metrics (`GET /metrics`), in its own registry:

- `treadle_gateway_requests_total{model, outcome}` — calls by outcome (`ok`, `failed`,
  and `refused_<status>` for requests refused before scheduling);
- `treadle_gateway_retries_total{model}` — sends that went to another replica;
- `treadle_gateway_aborted_total{model}` — calls whose client disconnected;
- `treadle_gateway_ttft_seconds{model}` — upstream time to first byte (histogram);
- `treadle_gateway_queue_wait_seconds` — time from arrival to dispatch (histogram);
- gauges read at scrape time: `treadle_gateway_in_flight{model}`,
  `treadle_gateway_queued{model}`, `treadle_gateway_programs`,
  `treadle_gateway_tenant_service_seconds{tenant}` (the GPU time fair shares count),
  `treadle_gateway_replica_up{model, replica}` (breaker not open).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from treadle.runtime.gateway.scheduling import GatewayScheduler
    from treadle.runtime.gateway.upstream import ModelPool

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class _State(Collector):
    def __init__(self, scheduler: GatewayScheduler, pools: Mapping[str, ModelPool]) -> None:
        self.scheduler = scheduler
        self.pools = pools

    def collect(self) -> Iterator[Metric]:
        sched = self.scheduler.scheduler
        in_flight = GaugeMetricFamily(
            "treadle_gateway_in_flight", "Calls sent upstream and not finished.", labels=["model"]
        )
        queued = GaugeMetricFamily(
            "treadle_gateway_queued", "Calls waiting in the scheduler.", labels=["model"]
        )
        limit = GaugeMetricFamily(
            "treadle_gateway_limit", "In-flight limit of a model.", labels=["model"]
        )
        for lane in sched.lanes:
            in_flight.add_metric([lane.name], lane.in_flight)
            queued.add_metric([lane.name], lane.queued)
            limit.add_metric([lane.name], lane.limit.value)
        yield in_flight
        yield queued
        yield limit
        yield GaugeMetricFamily(
            "treadle_gateway_programs", "Open programs.", value=len(self.scheduler.programs)
        )
        service = GaugeMetricFamily(
            "treadle_gateway_tenant_service_seconds",
            "GPU seconds served per tenant (what fair shares count).",
            labels=["tenant"],
        )
        for name, seconds in self.scheduler.service_by_tenant().items():
            service.add_metric([name], seconds)
        yield service
        up = GaugeMetricFamily(
            "treadle_gateway_replica_up",
            "1 while a replica's circuit breaker is not open.",
            labels=["model", "replica"],
        )
        for model, pool in self.pools.items():
            for r in pool.replicas:
                up.add_metric([model, r.name], 0.0 if r.breaker.state.value == "open" else 1.0)
        yield up


class GatewayMetrics:
    """Counters the request path updates, and the state gauges (module docstring)."""

    def __init__(self, scheduler: GatewayScheduler, pools: Mapping[str, ModelPool]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "treadle_gateway_requests",
            "Chat calls by outcome.",
            ["model", "outcome"],
            registry=self.registry,
        )
        self.retries = Counter(
            "treadle_gateway_retries",
            "Sends that went to another replica.",
            ["model"],
            registry=self.registry,
        )
        self.aborted = Counter(
            "treadle_gateway_aborted",
            "Calls whose client disconnected.",
            ["model"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "treadle_gateway_ttft_seconds",
            "Upstream time to the first byte of the answer.",
            ["model"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "treadle_gateway_queue_wait_seconds",
            "Arrival to dispatch.",
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_State(scheduler, pools))
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        # a `labels()` lookup per call costs; each child is made once
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def refused(self, status: int) -> None:
        self._child(self.requests, "", f"refused_{status}").inc()

    def retry(self, model: str) -> None:
        self._child(self.retries, model).inc()

    def aborted_call(self, model: str) -> None:
        self._child(self.aborted, model).inc()

    def finished(self, model: str, ok: bool, ttft_s: float | None) -> None:
        self._child(self.requests, model, "ok" if ok else "failed").inc()
        if ttft_s is not None:
            self._child(self.ttft, model).observe(ttft_s)
