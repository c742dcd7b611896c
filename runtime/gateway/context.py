"""`Gateway`: what the gateway's request path serves with — the served models' pools, the
scheduler, the shared HTTP client, tracing and metrics (one per gateway process)."""

from __future__ import annotations

import time

import httpx

from treadle.runtime.gateway.metrics import GatewayMetrics
from treadle.runtime.gateway.scheduling import GatewayScheduler
from treadle.runtime.gateway.tracing import GatewayTracing
from treadle.runtime.gateway.upstream import ModelPool


class Gateway:
    """What the app serves with: the pools, the scheduler, the HTTP client, tracing and
    metrics."""

    def __init__(
        self,
        pools: dict[str, ModelPool],
        scheduler: GatewayScheduler,
        client: httpx.AsyncClient,
        *,
        tracing: GatewayTracing | None = None,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self.pools = pools
        self.scheduler = scheduler
        self.client = client
        self.tracing = tracing or GatewayTracing()
        self.metrics = metrics or GatewayMetrics(scheduler, pools)
        self.started = time.time()
