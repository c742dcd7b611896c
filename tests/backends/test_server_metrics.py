"""Prometheus text from vLLM and SGLang into `ServerLoad`."""

from __future__ import annotations

import pytest
from fake_openai_server import SGLANG_METRICS_TEXT, VLLM_METRICS_TEXT

from treadle.backends.openai_compat.dialects import SGLANG_METRICS, VLLM_METRICS
from treadle.backends.openai_compat.server_metrics import (
    MetricsFormatError,
    ServerLoad,
    parse_server_load,
    windowed_hit_rate,
)

# vLLM before 0.9: only the old names, one engine, no `engine` label.
OLD_VLLM_TEXT = """\
# HELP vllm:num_requests_running Number of requests currently running on GPU.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 4.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="m"} 0.0
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="m"} 0.125
# HELP vllm:gpu_prefix_cache_queries_total GPU prefix cache queries.
# TYPE vllm:gpu_prefix_cache_queries_total counter
vllm:gpu_prefix_cache_queries_total{model_name="m"} 0.0
# HELP vllm:gpu_prefix_cache_hits_total GPU prefix cache hits.
# TYPE vllm:gpu_prefix_cache_hits_total counter
vllm:gpu_prefix_cache_hits_total{model_name="m"} 0.0
"""


def test_vllm_two_engines() -> None:
    load = parse_server_load(VLLM_METRICS_TEXT, VLLM_METRICS)
    assert (load.running, load.waiting) == (5, 5)  # summed over engines
    assert load.kv_usage == pytest.approx(0.4)  # averaged over engines
    assert load.prefix_hits == 4000 and load.prefix_queries == 10000
    assert load.prefix_hit_rate == pytest.approx(0.4)
    assert load.raw["vllm:prefix_cache_queries_total"] == 10000
    assert load.raw["vllm:time_to_first_token_seconds_count"] == 10
    assert not any(name.endswith("_bucket") for name in load.raw)


def test_vllm_old_names_and_no_queries_yet() -> None:
    load = parse_server_load(OLD_VLLM_TEXT, VLLM_METRICS)
    assert (load.running, load.waiting) == (4, 0)
    assert load.kv_usage == pytest.approx(0.125)
    assert load.prefix_hit_rate is None  # 0 queries: no rate, not a fake 0


def test_sglang_gauges() -> None:
    load = parse_server_load(SGLANG_METRICS_TEXT, SGLANG_METRICS)
    assert (load.running, load.waiting) == (7, 2)
    assert load.kv_usage == pytest.approx(0.28)
    assert load.prefix_hit_rate == pytest.approx(0.75)
    assert load.prefix_hits is None


def test_wrong_server_names_missing_gauges() -> None:
    with pytest.raises(MetricsFormatError, match="running: none of sglang:num_running_reqs"):
        parse_server_load(VLLM_METRICS_TEXT, SGLANG_METRICS)


def test_garbage_text() -> None:
    with pytest.raises(MetricsFormatError, match="not Prometheus"):
        parse_server_load("<html>502 Bad Gateway</html>", VLLM_METRICS)


def test_windowed_hit_rate() -> None:
    first = ServerLoad(
        running=0, waiting=0, prefix_hits=100, prefix_queries=1000, prefix_hit_rate=0.1
    )
    later = ServerLoad(
        running=0, waiting=0, prefix_hits=600, prefix_queries=1500, prefix_hit_rate=0.4
    )
    assert windowed_hit_rate(None, first) == pytest.approx(0.1)
    assert windowed_hit_rate(first, later) == pytest.approx(1.0)
    restarted = ServerLoad(
        running=0, waiting=0, prefix_hits=5, prefix_queries=10, prefix_hit_rate=0.5
    )
    assert windowed_hit_rate(later, restarted) == pytest.approx(0.5)
    idle = later.model_copy()
    assert windowed_hit_rate(later, idle) == pytest.approx(0.4)
