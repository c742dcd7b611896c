"""The node result cache (`cache: {ttl_s, key}`) on memory, sqlite and Redis: a cached LLM
node makes no call and spends no tokens, shows as `CacheHit` in events, traces and
metrics, and its key holds the tenant, the node's definition and its inputs. The
`LLMCallCache` interceptor caches single LLM calls the same way."""

from __future__ import annotations

import anyio
import pytest
from prometheus_client import CollectorRegistry
from runtime_support import StoreFactory

from treadle import ITEM, Graph, Runtime, ScriptedBackend, ScriptRule, step
from treadle.runtime.core.events import CacheHit, LLMCallFinished
from treadle.runtime.core.interceptors import LLMCallCache
from treadle.runtime.observe.metrics import RuntimeMetrics, summarize_run
from treadle.runtime.observe.tracing import T_CACHE_HIT, OtelTracer
from treadle.runtime.stores.memory import MemoryStore

pytestmark = pytest.mark.anyio


def cached_graph(**cache: object) -> Graph:
    g = Graph("cached", inputs={"question": str, "user": str})
    answer = g.llm(
        "answer",
        "Answer: {question}",
        inputs={"question": g.input.question},
        cache=cache or True,
    )
    g.output(answer=answer)
    return g


def llm_calls(events: list[object]) -> list[LLMCallFinished]:
    return [e for e in events if isinstance(e, LLMCallFinished)]


async def test_a_cached_llm_node_costs_no_tokens_in_another_runtime(
    store_factory: StoreFactory,
) -> None:
    backend = ScriptedBackend([ScriptRule(match="Answer", content="forty-two")])
    graph = cached_graph(ttl_s=3600)
    first_store = store_factory()
    first = await Runtime(store=first_store, models={"default": backend}).run(
        graph, {"question": "life?", "user": "a"}
    )
    assert first.output.answer == "forty-two" and len(llm_calls(first.events)) == 1
    if first_store is not store_factory():
        await first_store.close()
    second_store = store_factory()  # another process: the cache is in the store
    runtime = Runtime(store=second_store, models={"default": backend})
    again = await runtime.run(graph, {"question": "life?", "user": "b"})
    assert again.output.answer == "forty-two"
    assert llm_calls(again.events) == [] and backend.calls == 1
    [hit] = [e for e in again.events if isinstance(e, CacheHit)]
    assert hit.node == "answer" and hit.call_id is None
    other = await runtime.run(graph, {"question": "death?", "user": "a"})
    assert len(llm_calls(other.events)) == 1  # other inputs: another key
    await second_store.close()


async def test_keys_hold_the_tenant_the_chosen_inputs_and_the_definition() -> None:
    backend = ScriptedBackend()
    runtime = Runtime(models={"default": backend})

    def run(g: Graph, question: str, user: str, tenant: str = "t1"):  # type: ignore[no-untyped-def]
        return runtime.run(g, {"question": question, "user": user}, tenant=tenant)

    def keyed(prompt: str) -> Graph:
        g = Graph("keyed", inputs={"question": str, "user": str})
        inputs = {"question": g.input.question, "user": g.input.user}
        g.output(answer=g.llm("answer", prompt, cache={"key": ["question"]}, inputs=inputs).out)
        return g

    g = keyed("Answer {question} for {user}")
    await run(g, "q", "ada")
    assert backend.calls == 1
    await run(g, "q", "bob")  # `user` is not part of the key
    assert backend.calls == 1
    await run(g, "q", "ada", tenant="t2")  # another tenant never sees t1's entries
    assert backend.calls == 2
    changed = keyed("Reply to {question} for {user}")
    await run(changed, "q", "ada")  # another prompt: another key
    assert backend.calls == 3
    bad = Graph("badkey", inputs={"question": str})
    bad.llm("answer", "{question}", inputs={"question": bad.input.question},
            cache={"key": ["nope"]})  # fmt: skip
    with pytest.raises(Exception, match="cache key 'nope' is not one of the node's inputs"):
        bad.compile()


async def test_entries_expire_after_their_ttl(store_factory: StoreFactory) -> None:
    store = store_factory()
    await store.cache_put("fresh", b'"v"', 60)  # type: ignore[attr-defined]
    await store.cache_put("stale", b'"v"', 0.05)  # type: ignore[attr-defined]
    await anyio.sleep(0.1)
    assert await store.cache_get("fresh") == b'"v"'  # type: ignore[attr-defined]
    assert await store.cache_get("stale") is None  # type: ignore[attr-defined]
    await store.cache_put("forever", b"1", None)  # type: ignore[attr-defined]
    assert await store.cache_get("forever") == b"1"  # type: ignore[attr-defined]
    await store.close()


async def test_cache_hits_show_in_traces_metrics_and_summaries() -> None:
    tracer, exporter = OtelTracer.in_memory()
    metrics = RuntimeMetrics(CollectorRegistry())
    runtime = Runtime(listeners=[tracer.listener, metrics.listener])
    graph = cached_graph()
    await runtime.run(graph, {"question": "q", "user": "u"})
    again = await runtime.run(graph, {"question": "q", "user": "u"})
    spans = [
        s for s in exporter.get_finished_spans() if s.attributes.get("treadle.node") == "answer"
    ]
    assert [s.attributes.get(T_CACHE_HIT) for s in spans if s.name == "node"] == [None, True]
    rendered = metrics.render()
    assert 'treadle_result_cache_hits_total{scope="node",tenant=""} 1.0' in rendered
    assert summarize_run(again.events).result_cache_hits == 1


async def test_the_llm_call_cache_answers_repeated_calls_without_tokens() -> None:
    backend = ScriptedBackend([ScriptRule(match="Plan", content="step one")])
    cache = MemoryStore()
    metrics = RuntimeMetrics(CollectorRegistry())
    runtime = Runtime(
        models={"default": backend},
        interceptors=[LLMCallCache(cache, ttl_s=60)],
        listeners=[metrics.listener],
    )
    g = Graph("planning", inputs={"goals": list[str]})
    plans = g.map("plans", g.input.goals, step.llm("Plan for {g}", inputs={"g": ITEM}))
    g.output(plan=plans)
    first = await runtime.run(g, {"goals": ["a", "b"]})
    assert backend.calls == 2
    second = await runtime.run(g, {"goals": ["b", "a"]})
    assert backend.calls == 2  # every call answered by the cache
    hits = [e for e in second.events if isinstance(e, CacheHit)]
    assert len(hits) == 2 and all(h.call_id and h.saved_tokens > 0 for h in hits)
    assert all(e.prompt_tokens == 0 and e.completion_tokens == 0 for e in llm_calls(second.events))
    assert first.output.plan == list(reversed(second.output.plan))
    rendered = metrics.render()
    assert 'treadle_result_cache_hits_total{scope="llm_call",tenant=""} 2.0' in rendered
    assert "treadle_result_cache_saved_tokens_total" in rendered
