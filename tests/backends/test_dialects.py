"""Each dialect's request body and headers, field by field, against the real servers' names."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

import pytest

from treadle.backends.base import LLMRequest, SchedulingHints
from treadle.backends.openai_compat.backend import OpenAICompatBackend
from treadle.backends.openai_compat.dialects import (
    DIALECTS,
    ContinuumDialect,
    OpenAIDialect,
    SGLangDialect,
    SimDialect,
    VLLMDialect,
    make_dialect,
)

HINTS = SchedulingHints(
    priority=5,
    program_id="run-7",
    request_id="req-1",
    pin_ttl_s=2.5,
    is_last_step=False,
    next_tool="pytest",
    tenant="acme",
)

CORE = {"model", "messages", "stream"}


def _body(dialect: str, hints: SchedulingHints = HINTS, **options: object) -> tuple[dict, dict]:
    backend = OpenAICompatBackend(
        "http://127.0.0.1:9/v1", "served", dialect=dialect, dialect_options=options
    )
    request = LLMRequest(model="m", messages=[{"role": "user", "content": "x"}], hints=hints)
    body, headers = backend.build_request(request, stream=False)
    # every send carries its own id: the call's, plus a random suffix (see below)
    for fields, key in ((body, "rid"), (headers, "X-Request-Id")):
        if key in fields:
            call_id, suffix = fields[key].rsplit(".", 1)
            assert re.fullmatch("[0-9a-f]{8}", suffix), fields[key]
            fields[key] = call_id
    return {k: v for k, v in body.items() if k not in CORE}, headers


def test_each_send_of_a_call_has_its_own_request_id() -> None:
    """A retried call may reach a server that still runs its first try, and servers refuse
    an id in flight (SGLang: duplicate rid), so the wire id differs on every send."""
    backend = OpenAICompatBackend("http://127.0.0.1:9/v1", "served", dialect="sglang")
    request = LLMRequest(model="m", messages=[{"role": "user", "content": "x"}], hints=HINTS)
    ids = {backend.build_request(request, stream=False)[0]["rid"] for _ in range(3)}
    assert len(ids) == 3 and all(i.startswith("req-1.") for i in ids)


def _salt(secret: str, tenant: str) -> str:
    digest = hmac.new(secret.encode(), tenant.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def test_vllm_default_sends_no_priority_and_namespaced_xargs() -> None:
    body, headers = _body("vllm")
    # Without --scheduling-policy priority vLLM rejects any non-zero priority (400).
    assert "priority" not in body
    assert body == {
        "vllm_xargs": {
            "treadle_program_id": "run-7",
            "treadle_pin_ttl_s": 2.5,
            "treadle_next_tool": "pytest",
            "treadle_is_last_step": 0,
        }
    }
    assert headers == {"X-Request-Id": "req-1"}


def test_vllm_priority_scheduling_keeps_lower_first_and_salts_by_tenant() -> None:
    body, _ = _body("vllm", priority_scheduling=True, cache_salt_secret="s3cret", xargs=False)
    assert body == {"priority": 5, "cache_salt": _salt("s3cret", "acme")}
    assert len(body["cache_salt"]) == 43
    other, _ = _body(
        "vllm", HINTS.model_copy(update={"tenant": "globex"}), cache_salt_secret="s3cret"
    )
    assert other["cache_salt"] != body["cache_salt"]


def test_vllm_no_hints_no_fields() -> None:
    body, headers = _body("vllm", SchedulingHints())
    assert body == {}
    assert headers == {}


def test_sglang_negates_priority_by_default() -> None:
    body, headers = _body("sglang", priority_scheduling=True)
    assert body == {"rid": "req-1", "priority": -5}
    assert headers == {}


def test_sglang_low_priority_values_first_sends_priority_as_is() -> None:
    body, _ = _body("sglang", priority_scheduling=True, low_priority_values_first=True)
    assert body["priority"] == 5


def test_sglang_without_priority_scheduling_sends_no_priority() -> None:
    body, _ = _body("sglang")
    assert body == {"rid": "req-1"}
    assert "session_params" not in body and "session_id" not in body


def test_sglang_priority_order_is_preserved() -> None:
    """Treadle runs lower first; SGLang (default) runs higher first: the order must survive."""
    dialect = SGLangDialect(priority_scheduling=True)
    urgent, _ = dialect.hint_fields(SchedulingHints(priority=-10))
    lazy, _ = dialect.hint_fields(SchedulingHints(priority=10))
    assert urgent["priority"] > lazy["priority"]


def test_continuum_fields() -> None:
    body, headers = _body("continuum")
    assert body == {"job_id": "run-7", "is_last_step": False, "this_func_call": "pytest"}
    assert headers == {"X-Request-Id": "req-1"}
    last, _ = _body("continuum", HINTS.model_copy(update={"is_last_step": True}))
    assert last == {"job_id": "run-7", "is_last_step": True}


def test_continuum_without_program_sends_nothing() -> None:
    body, _ = _body("continuum", SchedulingHints(priority=3, next_tool="x"))
    assert body == {}


def test_sim_fields_top_level() -> None:
    body, headers = _body("sim")
    assert body == {
        "priority": 5,
        "program_id": "run-7",
        "pin_ttl_s": 2.5,
        "is_last_step": False,
    }
    assert headers == {"X-Request-Id": "req-1"}


def test_openai_sends_no_hints_and_non_strict_schema() -> None:
    body, headers = _body("openai")
    assert body == {}
    assert headers == {}
    fields = OpenAIDialect().structured_output({"title": "My Out!", "type": "object"})
    assert fields["response_format"]["json_schema"]["name"] == "My_Out_"
    assert fields["response_format"]["json_schema"]["strict"] is False


def test_capabilities() -> None:
    assert VLLMDialect().capabilities.priority is False
    assert VLLMDialect(priority_scheduling=True).capabilities.priority is True
    assert VLLMDialect().capabilities.prefix_cache is True
    assert ContinuumDialect().capabilities.program_id is True
    assert ContinuumDialect().capabilities.pin_ttl is False
    sim = SimDialect().capabilities
    assert sim.priority and sim.pin_ttl and sim.program_id and sim.metrics and sim.streaming
    assert OpenAIDialect().capabilities.metrics is False
    assert set(DIALECTS) == {
        "vllm",
        "sglang",
        "continuum",
        "llamacpp",
        "dynamo",
        "sim",
        "openai",
        "gateway",
    }


def test_metric_names_match_servers() -> None:
    vllm = VLLMDialect.metric_names
    assert vllm is not None
    assert vllm.running == ("vllm:num_requests_running",)
    assert vllm.waiting == ("vllm:num_requests_waiting",)
    assert vllm.kv_usage == ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
    assert vllm.prefix_hits[0] == "vllm:prefix_cache_hits"
    assert vllm.prefix_queries[0] == "vllm:prefix_cache_queries"
    sglang = SGLangDialect.metric_names
    assert sglang is not None
    assert (sglang.running, sglang.waiting) == (
        ("sglang:num_running_reqs",),
        ("sglang:num_queue_reqs",),
    )
    assert sglang.kv_usage == ("sglang:token_usage",)
    assert sglang.prefix_hit_rate == ("sglang:cache_hit_rate",)


def test_make_dialect_rejects_unknown() -> None:
    with pytest.raises(ValueError, match="unknown dialect 'tgi'; expected one of vllm"):
        make_dialect("tgi")
    with pytest.raises(ValueError, match="has no option 'flip'; options: priority_scheduling"):
        make_dialect("sglang", flip=True)
    with pytest.raises(ValueError, match=r"options: \(none\)"):
        make_dialect("openai", priority=1)


def test_sim_salts_by_tenant_like_vllm() -> None:
    body, _ = _body("sim", cache_salt_secret="s3cret")
    assert body["cache_salt"] == _salt("s3cret", "acme")
    assert "cache_salt" not in _body("sim")[0]  # no secret: no salt
