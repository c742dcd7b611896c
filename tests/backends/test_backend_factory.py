"""`create_backend`: every kind of `models:` entry, and the errors a bad one gets."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest

from treadle.backends.base import LLMRequest, Message
from treadle.backends.factory import create_backend
from treadle.backends.openai_compat.backend import OpenAICompatBackend
from treadle.backends.openai_compat.dialects import SGLangDialect
from treadle.backends.scripted import ScriptedBackend

HAS_LITELLM = importlib.util.find_spec("litellm") is not None
HAS_POOL = importlib.util.find_spec("treadle.backends.dispatch.pool") is not None


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


HAS_SIM = _module_exists("treadle.backends.sim.backend")

VLLM_ENTRY: dict[str, Any] = {
    "backend": "openai_compat",
    "base_url": "http://gpu1:8000/v1",
    "model": "meta-llama/Llama-3.1-8B-Instruct",
}


@pytest.mark.anyio
async def test_scripted() -> None:
    backend = create_backend(
        {"backend": "scripted", "latency_s": 0, "rules": [{"match": "ping", "content": "pong"}]}
    )
    assert isinstance(backend, ScriptedBackend)
    answer = await backend.generate(
        LLMRequest(model="m", messages=[Message(role="user", content="ping")])
    )
    assert answer.content == "pong"


def test_openai_compat_with_dialect_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TREADLE_TEST_KEY", "sk-abc")
    backend = create_backend(
        {
            **VLLM_ENTRY,
            "dialect": "sglang",
            "dialect_options": {"priority_scheduling": True, "low_priority_values_first": True},
            "api_key_env": "TREADLE_TEST_KEY",
            "timeout_s": 30,
            "retries": 4,
            "name": "gpu1",
            "headers": {"x-team": "infra"},
        }
    )
    assert isinstance(backend, OpenAICompatBackend)
    assert isinstance(backend.dialect, SGLangDialect)
    assert backend.dialect.low_priority_values_first is True
    assert backend.capabilities.priority is True
    assert (backend.retries, backend.timeout_s, backend.name) == (4, 30, "gpu1")
    _, headers = backend.build_request(
        LLMRequest(model="m", messages=[Message(role="user", content="x")]), stream=False
    )
    assert headers == {"x-team": "infra", "Authorization": "Bearer sk-abc"}


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"model": "x"}, "no 'backend' field"),
        ({"backend": "tgi"}, "unknown backend 'tgi'; expected one of scripted, openai_compat"),
        ({**VLLM_ENTRY, "base_ur": "http://x"}, "base_ur: unknown field"),
        ({k: v for k, v in VLLM_ENTRY.items() if k != "model"}, "model: Field required"),
        (
            {**VLLM_ENTRY, "base_url": "gpu1:8000"},
            "base_url: must start with http:// or https:// (got 'gpu1:8000')",
        ),
        ({**VLLM_ENTRY, "dialect": "tgi"}, "dialect: Input should be 'vllm'"),
        ({**VLLM_ENTRY, "retries": -1}, "retries: Input should be greater than or equal to 0"),
        ({**VLLM_ENTRY, "timeout_s": 0}, "timeout_s: Input should be greater than 0"),
        (
            {**VLLM_ENTRY, "dialect_options": {"flip": True}},
            "dialect_options: dialect 'vllm' has no option 'flip'",
        ),
        (
            {**VLLM_ENTRY, "dialect_options": {"priority_scheduling": "maybe"}},
            "dialect_options.priority_scheduling: Input should be a valid boolean",
        ),
        (
            {**VLLM_ENTRY, "api_key_env": "TREADLE_SURELY_UNSET_VAR"},
            "environment variable TREADLE_SURELY_UNSET_VAR is not set",
        ),
        ({"backend": "scripted", "latency_s": -1}, "latency_s: Input should be greater"),
        ({"backend": "scripted", "rules": [{"matc": "x"}]}, "rules.0.matc: unknown field"),
        ({"backend": "litellm"}, "model: Field required"),
        ({"backend": "pool", "replicas": []}, "replicas: List should have at least 1 item"),
    ],
)
def test_bad_entries_name_the_field(entry: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as info:
        create_backend(entry)
    assert message in str(info.value)


def test_not_a_mapping() -> None:
    with pytest.raises(ValueError, match="must be a mapping"):
        create_backend(["backend", "scripted"])


@pytest.mark.skipif(not HAS_LITELLM, reason="litellm (treadle[remote]) not installed")
def test_litellm_entry() -> None:
    from treadle.backends.litellm import LiteLLMBackend

    backend = create_backend(
        {
            "backend": "litellm",
            "model": "openai/gpt-4o-mini",
            "api_base": "http://gateway/v1",
            "timeout_s": 20,
            "params": {"max_retries": 1},
        }
    )
    assert isinstance(backend, LiteLLMBackend)
    assert backend.kwargs == {
        "max_retries": 1,
        "api_base": "http://gateway/v1",
        "timeout": 20,
        "num_retries": 2,
    }
    with pytest.raises(ValueError, match="params: model is set by treadle"):
        create_backend({"backend": "litellm", "model": "x", "params": {"model": "y"}})


def test_litellm_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "litellm" else real(name, *a)
    )
    with pytest.raises(
        ValueError, match=r"backend 'litellm' is not available: .*treadle\[remote\]"
    ):
        create_backend({"backend": "litellm", "model": "openai/gpt-4o-mini"})


@pytest.mark.skipif(not HAS_POOL, reason="treadle.backends.dispatch.pool not built yet")
def test_pool_of_replicas() -> None:
    from treadle.backends.dispatch.pool import ReplicaPool

    pool = create_backend(
        {
            "backend": "pool",
            "policy": "round_robin",
            "failure_threshold": 2,
            "replicas": [
                {**VLLM_ENTRY, "base_url": "http://gpu1:8000/v1"},
                {**VLLM_ENTRY, "base_url": "http://gpu2:8000/v1", "name": "second"},
            ],
        }
    )
    assert isinstance(pool, ReplicaPool)
    assert [s.name for s in pool.status()] == ["http://gpu1:8000/v1", "second"]
    assert pool.capabilities.prefix_cache is True


@pytest.mark.skipif(not HAS_POOL, reason="treadle.backends.dispatch.pool not built yet")
def test_pool_errors_name_replica_and_option() -> None:
    with pytest.raises(
        ValueError, match=r"invalid 'pool' model entry: replicas.1.model: Field required"
    ):
        create_backend(
            {
                "backend": "pool",
                "replicas": [VLLM_ENTRY, {"backend": "openai_compat", "base_url": "http://x"}],
            }
        )
    with pytest.raises(ValueError, match="polcy: unknown field"):
        create_backend({"backend": "pool", "polcy": "x", "replicas": [VLLM_ENTRY]})
    with pytest.raises(ValueError, match="invalid 'pool' model entry"):
        create_backend({"backend": "pool", "policy": "no-such-policy", "replicas": [VLLM_ENTRY]})


def test_sim_entry() -> None:
    if not HAS_SIM:
        with pytest.raises(ValueError, match="backend 'sim' is not available"):
            create_backend({"backend": "sim"})
        return
    from treadle.backends.sim.backend import SimBackend

    assert isinstance(create_backend({"backend": "sim"}), SimBackend)
    with pytest.raises(ValueError, match="no_such_option: unknown field; fields: backend, "):
        create_backend({"backend": "sim", "no_such_option": 1})


def test_entry_problems_are_found_without_building_and_name_the_field() -> None:
    """14.6: what `validate` reports for `models:` entries: each problem with its field
    (dotted, into a pool's replicas), nothing built, no environment read."""
    from treadle.backends.factory import model_entry_problems

    assert model_entry_problems(VLLM_ENTRY) == []
    assert model_entry_problems({**VLLM_ENTRY, "api_key_env": "TREADLE_SURELY_UNSET"}) == []
    assert model_entry_problems({**VLLM_ENTRY, "base_url": "localhost:8000"}) == [
        ("base_url", "must start with http:// or https:// (got 'localhost:8000')")
    ]
    urls = {"backend": "pool", "replicas": ["http://a:8000/v1", "http://b:8000/v1"]}
    ((field, what),) = model_entry_problems(urls)
    assert field == "replicas" and "replica 0 is 'http://a:8000/v1'" in what
    assert "each replica is a model entry of its own" in what
    nested = {"backend": "pool", "replicas": [VLLM_ENTRY, {**VLLM_ENTRY, "base_url": "b:1"}]}
    assert [f for f, _ in model_entry_problems(nested)] == ["replicas.1.base_url"]
