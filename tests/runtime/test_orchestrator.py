"""DAG semantics of the orchestrator, checked through the event log (never wall time)."""

from __future__ import annotations

import anyio
import pytest
from pydantic import BaseModel

from treadle import ITEM, Graph, Runtime, first_of, step
from treadle.runtime import RunFailed
from treadle.runtime.core.events import (
    NodeFailed,
    NodeFinished,
    NodeRetrying,
    NodeSkipped,
    NodeStarted,
    RunFinished,
)
from treadle.runtime.stores.memory import MemoryStore

pytestmark = pytest.mark.anyio


def inc(x: int) -> int:
    return x + 1


def add(a: int, b: int) -> int:
    return a + b


def order_of(events: list, cls: type, node: str) -> int:
    return next(e.seq for e in events if isinstance(e, cls) and e.node == node)


async def test_diamond_joins_both_sides() -> None:
    g = Graph("diamond", inputs={"x": int})
    a = g.func("a", inc, inputs={"x": g.input.x})
    left = g.func("left", inc, inputs={"x": a})
    right = g.func("right", lambda x: x * 10, inputs={"x": a})
    g.output(total=g.func("join", add, inputs={"a": left, "b": right}).out)
    result = await Runtime().run(g, {"x": 1})
    assert result.output.total == 3 + 20
    ev = result.events
    assert order_of(ev, NodeFinished, "left") < order_of(ev, NodeStarted, "join")
    assert order_of(ev, NodeFinished, "right") < order_of(ev, NodeStarted, "join")


async def test_no_barrier_fast_branch_does_not_wait_for_slow_sibling() -> None:
    gate = anyio.Event()

    async def slow(x: int) -> int:
        await gate.wait()  # released only once the fast branch's successor has run
        return x

    def fast_next(x: int) -> int:
        gate.set()
        return x + 1

    g = Graph("nobarrier", inputs={"x": int})
    s = g.func("slow", slow, inputs={"x": g.input.x})
    f = g.func("fast", inc, inputs={"x": g.input.x})
    n = g.func("fast_next", fast_next, inputs={"x": f})
    g.output(s=s.out, n=n.out)
    result = await Runtime().run(g, {"x": 1})
    ev = result.events
    # the successor of the fast branch started before the slow sibling finished
    assert order_of(ev, NodeStarted, "fast_next") < order_of(ev, NodeFinished, "slow")
    assert result.output.n == 3


async def test_map_fans_out_and_joins_in_order() -> None:
    def words(text: str) -> list[str]:
        return text.split()

    async def shout(w: str) -> str:
        await anyio.sleep(0.001 * len(w))
        return w.upper()

    g = Graph("map", inputs={"text": str})
    ws = g.func("words", words, inputs={"text": g.input.text})
    up = g.map("shout", ws.out, step.func(shout, inputs={"w": ITEM}), concurrency=2)
    joined = g.func("join", lambda parts: "-".join(parts), inputs={"parts": up})
    g.output(out=joined.out)
    result = await Runtime().run(g, {"text": "ccc a bb"})
    assert result.output.out == "CCC-A-BB"
    instances = [e.node for e in result.events if isinstance(e, NodeFinished) and "[" in e.node]
    assert sorted(instances) == ["shout[0]", "shout[1]", "shout[2]"]


async def test_map_with_reduce_and_empty_list() -> None:
    g = Graph("reduce", inputs={"xs": list[int]})
    m = g.map("sq", g.input.xs, step.func(lambda v: v * v, inputs={"v": ITEM}), reduce=sum)
    g.output(total=m.out)
    rt = Runtime()
    assert (await rt.run(g, {"xs": [1, 2, 3]})).output.total == 14
    assert (await rt.run(g, {"xs": []})).output.total == 0


async def test_branch_skips_the_untaken_side_and_first_of_joins() -> None:
    g = Graph("branch", inputs={"x": int})
    check = g.branch(
        "check",
        {"true": ["big"], "false": ["small"]},
        inputs={"v": g.input.x},
        route=lambda v: v > 10,
    )
    big = g.func("big", lambda x: f"big {x}", inputs={"x": g.input.x})
    small = g.func("small", lambda x: f"small {x}", inputs={"x": g.input.x})
    after_big = g.func("after_big", lambda s: s + "!", inputs={"s": big})
    out = g.func("out", lambda s: s, inputs={"s": first_of(big.out, small.out)})
    g.output(out=out.out)
    del check, after_big
    result = await Runtime().run(g, {"x": 3})
    assert result.output.out == "small 3"
    skipped = {e.node for e in result.events if isinstance(e, NodeSkipped)}
    assert skipped == {"big", "after_big"}  # skipping propagates to dependents
    started = {e.node for e in result.events if isinstance(e, NodeStarted)}
    assert "big" not in started and "after_big" not in started


async def test_retries_with_backoff_then_success() -> None:
    calls = {"n": 0}

    async def flaky(x: int) -> int:
        calls["n"] += 1
        if calls["n"] < 3:
            raise ConnectionError("transient")
        return x

    g = Graph("retry", inputs={"x": int})
    g.output(out=g.func("flaky", flaky, inputs={"x": g.input.x}, retries=3, backoff_s=0.001).out)
    result = await Runtime().run(g, {"x": 7})
    assert result.output.out == 7
    retries = [e for e in result.events if isinstance(e, NodeRetrying)]
    assert [r.attempt for r in retries] == [1, 2]
    assert all("ConnectionError: transient" in r.error for r in retries)
    assert [e.attempt for e in result.events if isinstance(e, NodeStarted)] == [1, 2, 3]


async def test_retries_exhausted_fail_the_run_with_the_node_named() -> None:
    def boom(x: int) -> int:
        raise ValueError("bad value")

    g = Graph("fail", inputs={"x": int})
    g.output(
        out=g.func(
            "boom", boom, inputs={"x": g.input.x}, retries=1, backoff_s=0.001, blocking=True
        ).out
    )
    result = await Runtime().run(g, {"x": 1}, check=False)
    assert result.status == "failed"
    assert "boom" in (result.error or "") and "bad value" in (result.error or "")
    with pytest.raises(RunFailed, match="bad value"):
        result.raise_for_status()


async def test_timeout_fails_the_attempt() -> None:
    async def hang(x: int) -> int:
        await anyio.sleep(30)
        return x

    g = Graph("timeout", inputs={"x": int})
    g.output(out=g.func("hang", hang, inputs={"x": g.input.x}, timeout_s=0.05).out)
    result = await Runtime().run(g, {"x": 1}, check=False)
    assert result.status == "failed"
    failed = [e for e in result.events if isinstance(e, NodeFailed)]
    assert failed and "timed out after 0.05 s" in failed[0].error


async def test_error_policies_skip_and_fallback() -> None:
    def boom(x: int) -> int:
        raise RuntimeError("nope")

    g = Graph("policies", inputs={"x": int})
    skipped = g.func("skipped", boom, inputs={"x": g.input.x}, on_error="skip")
    after = g.func("after", inc, inputs={"x": skipped})
    fb = g.func("fb", boom, inputs={"x": g.input.x}, on_error="fallback", fallback=42)
    g.output(
        fb=fb.out, alt=g.func("alt", lambda v: v, inputs={"v": first_of(after.out, fb.out)}).out
    )
    result = await Runtime().run(g, {"x": 1})
    assert result.output.fb == 42 and result.output.alt == 42
    policies = {e.node: e.policy for e in result.events if isinstance(e, NodeFailed)}
    assert policies == {"skipped": "skip", "fb": "fallback"}
    assert {e.node for e in result.events if isinstance(e, NodeSkipped)} == {"skipped", "after"}


async def test_cancellation_mid_run_leaves_nothing_running() -> None:
    started = anyio.Event()
    finished: list[str] = []

    async def slow(x: int) -> int:
        started.set()
        try:
            await anyio.sleep(30)
        finally:
            finished.append("cleanup")
        return x

    g = Graph("cancel", inputs={"x": int})
    a = g.func("a", slow, inputs={"x": g.input.x})
    b = g.func("b", slow, inputs={"x": g.input.x})
    g.output(out=g.func("c", add, inputs={"a": a, "b": b}).out)
    rt = Runtime()
    async with rt.start(g, {"x": 1}) as run:
        await started.wait()
        run.cancel()
        result = await run.result()
    assert result.status == "cancelled"
    assert finished == ["cleanup", "cleanup"]  # both running nodes were unwound
    assert isinstance(result.events[-1], RunFinished)
    assert not any(isinstance(e, NodeStarted) and e.node == "c" for e in result.events)
    record = await rt.store.get_run(run.run_id)
    assert record is not None and record.status == "cancelled"


async def test_events_have_dense_sequence_numbers_and_stream_live() -> None:
    g = Graph("stream", inputs={"x": int})
    a = g.func("a", inc, inputs={"x": g.input.x})
    g.output(out=g.func("b", inc, inputs={"x": a}).out)
    async with Runtime().start(g, {"x": 0}) as run:
        seen = [e async for e in run.events()]
    assert [e.seq for e in seen] == list(range(1, len(seen) + 1))
    assert isinstance(seen[-1], RunFinished)


class CountingStore(MemoryStore):
    """A memory store that counts what the runtime writes."""

    def __init__(self) -> None:
        super().__init__()
        self.output_writes: list[str] = []

    async def record(self, run_id, events, outputs=None):  # type: ignore[no-untyped-def]
        self.output_writes += list(outputs or {})
        await super().record(run_id, events, outputs)


async def test_checkpoints_are_deltas_one_write_per_finished_node() -> None:
    g = Graph("deltas", inputs={"x": int})
    prev = g.input.x
    for i in range(5):
        prev = g.func(f"n{i}", inc, inputs={"x": prev}).out
    g.output(out=prev)
    store = CountingStore()
    await Runtime(store=store).run(g, {"x": 0})
    assert store.output_writes == [f"n{i}" for i in range(5)]


async def test_resume_does_not_rerun_finished_nodes() -> None:
    runs: list[str] = []

    def tracked(name: str):  # type: ignore[no-untyped-def]
        def fn(x: int) -> int:
            runs.append(name)
            if name == "c" and runs.count("c") == 1:
                raise RuntimeError("crash")
            return x + 1

        return fn

    g = Graph("resume", inputs={"x": int})
    a = g.func("a", tracked("a"), inputs={"x": g.input.x})
    b = g.func("b", tracked("b"), inputs={"x": a})
    g.output(out=g.func("c", tracked("c"), inputs={"x": b}).out)
    rt = Runtime()
    first = await rt.run(g, {"x": 0}, check=False)
    assert first.status == "failed"
    second = await rt.resume(first.run_id, g)
    assert second.output.out == 3
    assert runs == ["a", "b", "c", "c"]
    seqs = [e.seq for e in await rt.store.read_events(first.run_id)]
    assert seqs == list(range(1, len(seqs) + 1))


class Point(BaseModel):
    x: int
    y: int


async def test_subgraph_runs_as_one_node_with_typed_output() -> None:
    inner = Graph("inner", inputs={"v": int})
    p = inner.func("p", lambda v: Point(x=v, y=v * 2), inputs={"v": inner.input.v})
    inner.output(point=p.out)
    outer = Graph("outer", inputs={"v": int})
    sub = outer.subgraph("sub", inner, inputs={"v": outer.input.v})
    outer.output(y=outer.func("y", lambda y: y + 1, inputs={"y": sub.out.point.y}).out)
    result = await Runtime().run(outer, {"v": 5})
    assert result.output.y == 11
    assert any(isinstance(e, NodeFinished) and e.node == "sub/p" for e in result.events)


async def test_map_over_a_subgraph() -> None:
    inner = Graph("double", inputs={"v": int})
    inner.output(out=inner.func("d", lambda v: v * 2, inputs={"v": inner.input.v}).out)
    g = Graph("outer", inputs={"xs": list[int]})
    m = g.map("each", g.input.xs, step.subgraph(inner, inputs={"v": ITEM}))
    g.output(outs=g.func("collect", lambda rs: [r.out for r in rs], inputs={"rs": m}).out)
    result = await Runtime().run(g, {"xs": [1, 2, 3]})
    assert result.output.outs == [2, 4, 6]


async def test_invalid_inputs_are_a_clear_error() -> None:
    from treadle import InvalidInputs

    g = Graph("typed", inputs={"x": int})
    g.output(out=g.func("a", inc, inputs={"x": g.input.x}).out)
    with pytest.raises(InvalidInputs, match="x: Input should be a valid integer"):
        await Runtime().run(g, {"x": "seven"})


async def test_unserializable_output_fails_the_node_clearly() -> None:
    class Opaque:
        pass

    g = Graph("opaque", inputs={"x": int})
    g.output(out=g.func("a", lambda x: Opaque(), inputs={"x": g.input.x}).out)
    result = await Runtime().run(g, {"x": 1}, check=False)
    assert result.status == "failed"
    assert "cannot be serialized" in (result.error or "")


async def test_global_concurrency_limit_is_respected() -> None:
    active = {"now": 0, "max": 0}

    async def work(v: int) -> int:
        active["now"] += 1
        active["max"] = max(active["max"], active["now"])
        await anyio.sleep(0.001)
        active["now"] -= 1
        return v

    g = Graph("limit", inputs={"x": int})
    for i in range(8):
        g.func(f"w{i}", work, inputs={"v": g.input.x})
    await Runtime(max_concurrency=3).run(g, {"x": 1})
    assert active["max"] == 3


async def test_retry_delays_follow_backoff_cap_and_jitter() -> None:
    calls = 0

    def flaky(x: int) -> int:
        nonlocal calls
        calls += 1
        if calls < 5:
            raise ConnectionError("transient")
        return x

    g = Graph("backoff", inputs={"x": int})
    g.output(
        out=g.func(
            "flaky",
            flaky,
            inputs={"x": g.input.x},
            retries=4,
            backoff_s=0.001,
            backoff_max_s=0.004,
            jitter=0.5,
        ).out
    )
    result = await Runtime().run(g, {"x": 1})
    delays = [e.delay_s for e in result.events if isinstance(e, NodeRetrying)]
    # the n-th pause: min(cap, base * 2**(n-1)), less a random share of at most `jitter`
    for n, delay in enumerate(delays, start=1):
        full = min(0.004, 0.001 * 2 ** (n - 1))
        assert full * 0.5 <= delay <= full
    assert len(delays) == 4


async def test_a_failure_that_is_not_retryable_is_not_retried() -> None:
    from treadle.runtime.core.errors import NodeError

    def refuse(x: int) -> int:
        raise NodeError("refuse", "bad arguments", retryable=False)

    g = Graph("final", inputs={"x": int})
    g.output(out=g.func("refuse", refuse, inputs={"x": g.input.x}, retries=3).out)
    result = await Runtime().run(g, {"x": 1}, check=False)
    assert result.status == "failed"
    assert not [e for e in result.events if isinstance(e, NodeRetrying)]
    (failed,) = [e for e in result.events if isinstance(e, NodeFailed)]
    assert failed.attempt == 1


async def test_a_subgraph_under_a_concurrency_limit_of_one_does_not_deadlock() -> None:
    async def slow(x: int) -> int:
        await anyio.sleep(0)
        return x + 1

    inner = Graph("inner", inputs={"x": int})
    inner.output(y=inner.func("a", slow, inputs={"x": inner.input.x}).out)
    g = Graph("outer", inputs={"x": int})
    g.output(z=g.subgraph("s", inner, inputs={"x": g.input.x}).out)
    with anyio.fail_after(10):
        result = await Runtime(max_concurrency=1).run(g, {"x": 1})
    assert result.output.z.y == 2


async def test_cancelling_a_node_between_retries_stops_it() -> None:
    attempts = 0

    async def failing(x: int) -> int:
        nonlocal attempts
        attempts += 1
        raise ConnectionError("down")

    g = Graph("cancel-retries", inputs={"x": int})
    g.output(out=g.func("f", failing, inputs={"x": g.input.x}, retries=50, backoff_s=0.01).out)
    runtime = Runtime()
    async with runtime.start(g, {"x": 1}) as run:
        async for event in run.events():
            if isinstance(event, NodeRetrying) and event.attempt == 2:
                run.cancel()
        result = await run.result()
    assert result.status == "cancelled"
    assert attempts < 50


@pytest.mark.parametrize("parent_is_async", [False, True])
async def test_a_quick_sync_sibling_does_not_wait_for_a_slow_async_one(
    parent_is_async: bool,
) -> None:
    """14.1: `a → b` (async) and `a → c` (plain def): c runs while b is still running."""
    gate = anyio.Event()

    async def slow(x: int) -> int:
        await gate.wait()  # released only by the quick sibling
        return x

    def quick(x: int) -> int:
        gate.set()
        return x + 1

    async def parent_async(x: int) -> int:
        return x

    g = Graph("siblings", inputs={"x": int})
    a = g.func("a", parent_async if parent_is_async else inc, inputs={"x": g.input.x})
    g.func("b", slow, inputs={"x": a})
    g.func("c", quick, inputs={"x": a})
    with anyio.fail_after(5):  # before the fix: c waited for b, which waits for c
        result = await Runtime().run(g, {"x": 1})
    ev = result.events
    assert order_of(ev, NodeStarted, "c") < order_of(ev, NodeFinished, "b")


async def test_a_node_timeout_closes_the_calls_it_cut_off() -> None:
    """14.2: a tool (or LLM) call ended by its node's timeout gets its finished event, failed,
    so traces, summaries and spans do not show it running forever."""
    from treadle import ScriptedBackend, tool
    from treadle.backends.base import LLMRequest, LLMResponse
    from treadle.runtime.core.events import (
        LLMCallFinished,
        LLMCallQueued,
        ToolCallFinished,
        ToolCallStarted,
    )
    from treadle.runtime.observe.metrics import summarize_run

    @tool
    async def slow(x: int) -> int:
        """Slow."""
        await anyio.sleep(30)
        return x

    class Hanging(ScriptedBackend):
        async def generate(self, request: LLMRequest) -> LLMResponse:
            await anyio.sleep(30)
            raise AssertionError("unreachable")

    g = Graph("cutoff", inputs={"x": int})
    t = g.tool("t", slow, inputs={"x": g.input.x}, timeout_s=0.05, retries=1, backoff_s=0)
    m = g.llm("m", "say {x}", inputs={"x": g.input.x}, timeout_s=0.05, on_error="skip")
    g.output(t=t.out, m=first_of(m.out, t.out))
    result = await Runtime(models={"default": Hanging()}).run(g, {"x": 1}, check=False)
    ev = result.events
    started = [e.call_id for e in ev if isinstance(e, ToolCallStarted)]
    finished = {e.call_id: e for e in ev if isinstance(e, ToolCallFinished)}
    assert len(started) == 2 and set(started) == set(finished)
    assert all(not f.ok and "cancelled" in (f.error or "") for f in finished.values())
    queued = [e.call_id for e in ev if isinstance(e, LLMCallQueued)]
    llm_done = {e.call_id: e for e in ev if isinstance(e, LLMCallFinished)}
    assert queued and set(queued) == set(llm_done)
    assert all("cancelled" in (f.error or "") for f in llm_done.values())
    summary = summarize_run(ev)
    assert summary.tool_calls == 2 and summary.tool_errors == 2
    assert summary.llm_calls == 1 and summary.llm_errors == 1


@pytest.mark.parametrize("output_uses_targets", [True, False])
async def test_a_branch_with_no_route_for_its_label_fails_itself_once(
    output_uses_targets: bool,
) -> None:
    """14.4: no route for the label and no default: the branch fails, saying so once; a
    target that never ran is not blamed, and the run does not silently succeed."""
    g = Graph("colors", inputs={"color": str})
    pick = g.branch("pick", {"red": ["set_red"], "blue": ["set_blue"]}, inputs={"c": g.input.color})
    red = g.func("set_red", lambda: "R", inputs={})
    blue = g.func("set_blue", lambda: "B", inputs={})
    if output_uses_targets:
        g.output(colors=first_of(red.out, blue.out))
    else:
        g.output(picked=pick.out)
    result = await Runtime().run(g, {"color": "yellow"}, check=False)
    assert result.status == "failed"
    error = result.error or ""
    assert error.startswith("node 'pick' failed:"), error
    assert "no route for 'yellow'" in error and "red, blue" in error
    assert error.count("yellow") == 1
    failed = [e.node for e in result.events if isinstance(e, NodeFailed)]
    assert failed == ["pick"]


async def test_an_unavailable_output_blames_no_node_and_gives_each_reason_once() -> None:
    """14.4: every target skipped (the branch failed under on_error='skip'): the output is
    unavailable, said once, without blaming a target that never ran."""
    g = Graph("colors", inputs={"color": str})
    g.branch(
        "pick",
        {"red": ["set_red"], "blue": ["set_blue"]},
        inputs={"c": g.input.color},
        on_error="skip",
    )
    red = g.func("set_red", lambda: "R", inputs={})
    blue = g.func("set_blue", lambda: "B", inputs={})
    g.output(colors=first_of(red.out, blue.out))
    result = await Runtime().run(g, {"color": "yellow"}, check=False)
    assert result.status == "failed"
    assert result.error == "output 'colors' is unavailable: branch 'pick' was skipped"
