"""The daemon's shared objects for one process: Redis clients, the stores, the registry,
quotas and the run service, opened and closed together."""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis

from treadle.runtime.daemon.checker import Settings, checker_for
from treadle.runtime.daemon.config import DaemonConfig
from treadle.runtime.daemon.import_allowlist import ImportAllowList
from treadle.runtime.daemon.keys import DaemonKeys
from treadle.runtime.daemon.quotas import Quotas
from treadle.runtime.daemon.registry import WorkflowRegistry
from treadle.runtime.daemon.runs import RunService
from treadle.runtime.daemon.tenants import TenantStore
from treadle.runtime.daemon.workqueue import WorkQueue
from treadle.runtime.stores.redis import RedisStore, connect


@dataclass
class Services:
    config: DaemonConfig
    keys: DaemonKeys
    redis: Redis
    #: for blocking reads (event streams), so they never starve ordinary requests
    stream_redis: Redis
    store: RedisStore
    queue: WorkQueue
    tenants: TenantStore
    registry: WorkflowRegistry
    quotas: Quotas
    runs: RunService

    @classmethod
    def open(cls, config: DaemonConfig) -> Services:
        """Make the clients (connections are opened lazily, on first use)."""
        keys = DaemonKeys(config.prefix)
        redis = connect(config.redis_url, max_connections=128)
        stream_redis = connect(config.redis_url, max_connections=config.max_event_streams + 8)
        store = RedisStore(redis, prefix=config.prefix)
        queue = WorkQueue(redis, prefix=config.prefix, lease_ms=config.lease_ms)
        allowlist = ImportAllowList(config.allow_imports, config.allow_backends)
        settings = Settings(
            allow_imports=config.allow_imports,
            allow_backends=config.allow_backends,
            models=tuple(config.models),
            max_bytes=config.max_definition_bytes,
        )
        registry = WorkflowRegistry(
            redis,
            keys,
            allowlist,
            models=list(config.models),
            max_bytes=config.max_definition_bytes,
            # started on first use: only the API registers definitions and submits runs
            checker=checker_for(settings, config.check_timeout_s),
        )
        quotas = Quotas(redis, keys)
        return cls(
            config=config,
            keys=keys,
            redis=redis,
            stream_redis=stream_redis,
            store=store,
            queue=queue,
            tenants=TenantStore(redis, keys),
            registry=registry,
            quotas=quotas,
            runs=RunService(redis, store, registry, quotas),
        )

    async def close(self) -> None:
        await self.redis.aclose()
        await self.stream_redis.aclose()
