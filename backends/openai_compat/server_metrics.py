"""Read a serving engine's load from its Prometheus `/metrics` text.

Engines name their gauges differently (vLLM `vllm:num_requests_running`, SGLang
`sglang:num_running_reqs`, ...); a `MetricNames` record says which names to read, and
`parse_server_load` turns the exposition text into a `ServerLoad` the router can compare
across replicas. Parsing is done by `prometheus_client`'s own text parser.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping

from pydantic import BaseModel, ConfigDict, Field

from treadle.errors import BackendError


class MetricNames(BaseModel):
    """Which metric families carry a server's load.

    Each field lists alternatives, best first: engines rename metrics between versions
    (vLLM 0.9 renamed `vllm:gpu_cache_usage_perc` to `vllm:kv_cache_usage_perc`), and the
    first one present wins. Counter names are given without the `_total` suffix.
    """

    model_config = ConfigDict(frozen=True)

    running: tuple[str, ...]
    waiting: tuple[str, ...]
    #: fraction (0..1) of KV cache blocks in use
    kv_usage: tuple[str, ...] = ()
    #: cumulative counters of prefix-cache hits and queries (tokens)
    prefix_hits: tuple[str, ...] = ()
    prefix_queries: tuple[str, ...] = ()
    #: a counter of prompt tokens computed (not from the cache), for engines that count
    #: misses instead of queries (llama.cpp): queries = hits + misses
    prefix_misses: tuple[str, ...] = ()
    #: a gauge holding a hit rate directly, for engines that export no counters
    prefix_hit_rate: tuple[str, ...] = ()


class ServerLoad(BaseModel):
    """One scrape of a server's load.

    `running`/`waiting` are summed over label sets (one per data-parallel engine);
    `kv_usage` is their mean. `prefix_hit_rate` is hits/queries over the counters'
    lifetime, or the engine's own gauge; `OpenAICompatBackend.metrics()` narrows it to the
    interval since its previous scrape. `raw` maps every sample name to its value summed over
    label sets (histogram buckets left out).
    """

    running: int
    waiting: int
    kv_usage: float | None = None
    prefix_hit_rate: float | None = None
    prefix_hits: float | None = None
    prefix_queries: float | None = None
    raw: dict[str, float] = Field(default_factory=dict)


class MetricsFormatError(BackendError, ValueError):
    """The text is not Prometheus exposition, or lacks the metrics a dialect needs."""


def parse_server_load(text: str, names: MetricNames) -> ServerLoad:
    """Parse Prometheus exposition `text` into a `ServerLoad` using `names`."""
    samples = _collect_samples(text)
    running = _first(samples, names.running, "sum")
    waiting = _first(samples, names.waiting, "sum")
    if running is None or waiting is None:
        missing = [
            f"{label}: none of {', '.join(wanted)}"
            for label, value, wanted in (
                ("running", running, names.running),
                ("waiting", waiting, names.waiting),
            )
            if value is None
        ]
        raise MetricsFormatError(f"metrics text lacks the load gauges ({'; '.join(missing)})")

    hits = _first(samples, names.prefix_hits, "sum")
    queries = _first(samples, names.prefix_queries, "sum")
    if queries is None and hits is not None:
        misses = _first(samples, names.prefix_misses, "sum")
        queries = None if misses is None else hits + misses
    if hits is not None and queries is not None:
        hit_rate: float | None = hits / queries if queries > 0 else None
    else:
        hit_rate = _first(samples, names.prefix_hit_rate, "mean")

    return ServerLoad(
        running=round(running),
        waiting=round(waiting),
        kv_usage=_first(samples, names.kv_usage, "mean"),
        prefix_hit_rate=hit_rate,
        prefix_hits=hits,
        prefix_queries=queries,
        raw={name: sum(values) for name, values in samples.items()},
    )


def windowed_hit_rate(previous: ServerLoad | None, current: ServerLoad) -> float | None:
    """The prefix hit rate between two scrapes of the same server's counters.

    Falls back to `current.prefix_hit_rate` when there is no previous scrape, the server
    exports no counters, nothing was queried in between, or the counters went backwards
    (the server restarted).
    """
    if (
        previous is None
        or previous.prefix_hits is None
        or previous.prefix_queries is None
        or current.prefix_hits is None
        or current.prefix_queries is None
    ):
        return current.prefix_hit_rate
    d_queries = current.prefix_queries - previous.prefix_queries
    d_hits = current.prefix_hits - previous.prefix_hits
    if d_queries <= 0 or d_hits < 0:
        return current.prefix_hit_rate
    return d_hits / d_queries


def _collect_samples(text: str) -> dict[str, list[float]]:
    # imported on first use: only a process that reads servers' metrics pays for the import
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[str, list[float]] = defaultdict(list)
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                # Buckets (and quantiles) differ only by a label that must not be summed.
                if "le" in sample.labels or "quantile" in sample.labels:
                    continue
                samples[sample.name].append(float(sample.value))
    except ValueError as exc:
        raise MetricsFormatError(f"not Prometheus text exposition: {exc}") from exc
    return samples


def _first(samples: Mapping[str, list[float]], names: Iterable[str], how: str) -> float | None:
    for name in names:
        # prometheus_client reports a counter's samples as `<name>_total`.
        for key in (name, f"{name}_total"):
            values = samples.get(key)
            if values:
                total = sum(values)
                return total if how == "sum" else total / len(values)
    return None
