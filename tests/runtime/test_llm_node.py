"""The `llm` node: templated prompts, typed outputs, the tool-calling conversation, output
repair, and the scripted backend that runs it all offline."""

from __future__ import annotations

import json

import anyio
import pytest
from pydantic import BaseModel

from treadle import Graph, Runtime, ScriptedBackend, ScriptRule, tool
from treadle.backends.base import LLMRequest, LLMResponse, Message
from treadle.backends.scripted import generate_from_schema
from treadle.runtime.core.events import LLMCallFinished, ToolCallFinished, ToolCallStarted

pytestmark = pytest.mark.anyio


class Weather(BaseModel):
    city: str
    celsius: float


class Nested(BaseModel):
    tags: list[str]
    score: int
    inner: Weather | None
    mode: str = "fast"


def test_schema_generation_validates_and_is_deterministic() -> None:
    schema = Nested.model_json_schema()
    a = generate_from_schema(schema, "seed")
    assert Nested.model_validate(a) and a == generate_from_schema(schema, "seed")
    assert generate_from_schema(schema, "other") != a


@tool(expected_duration_s=0.01)
async def get_weather(city: str) -> Weather:
    """Current weather in a city."""
    await anyio.sleep(0.005)  # a real call waits on I/O
    return Weather(city=city, celsius=21.5 if city == "Lisbon" else 8.0)


def weather_graph(rules: list[ScriptRule], max_turns: int = 4) -> tuple[Graph, Runtime]:
    g = Graph("weather", inputs={"q": str})
    node = g.llm(
        "ask",
        "Question: {q}",
        output=Weather,
        tools=[get_weather],
        inputs={"q": g.input.q},
        max_turns=max_turns,
    )
    g.output(answer=node.out)
    return g, Runtime(models={"default": ScriptedBackend(rules)})


async def test_tool_calls_run_in_parallel_and_results_go_back_to_the_model() -> None:
    rules = [
        ScriptRule(
            match="warmer",
            tool_calls=[
                {"name": "get_weather", "arguments": {"city": "Lisbon"}},
                {"name": "get_weather", "arguments": {"city": "Oslo"}},
            ],
        ),
        ScriptRule(match="warmer", content='{"city": "Lisbon", "celsius": 21.5}'),
    ]
    g, rt = weather_graph(rules)
    result = await rt.run(g, {"q": "Is Lisbon or Oslo warmer?"})
    assert result.output.answer == Weather(city="Lisbon", celsius=21.5)
    kinds = [
        type(e).__name__ for e in result.events if isinstance(e, ToolCallStarted | ToolCallFinished)
    ]
    # both calls started before either finished: they ran concurrently
    assert kinds[:2] == ["ToolCallStarted", "ToolCallStarted"]
    calls = [e for e in result.events if isinstance(e, LLMCallFinished)]
    assert [c.tool_calls for c in calls] == [2, 0]


async def test_tool_errors_are_returned_to_the_model_not_raised() -> None:
    seen: list[str] = []

    class Recording(ScriptedBackend):
        async def generate(self, request: LLMRequest):  # type: ignore[no-untyped-def]
            seen.extend(m.content or "" for m in request.messages if m.role == "tool")
            return await super().generate(request)

    rules = [
        ScriptRule(
            match="x",
            tool_calls=[
                {"name": "get_weather", "arguments": {"town": "Rome"}},
                {"name": "no_such_tool", "arguments": {}},
            ],
        ),
        ScriptRule(match="x", content='{"city": "Rome", "celsius": 1}'),
    ]
    g = Graph("errs", inputs={"q": str})
    g.output(
        a=g.llm("ask", "{q}", output=Weather, tools=[get_weather], inputs={"q": g.input.q}).out
    )
    result = await Runtime(models={"default": Recording(rules)}).run(g, {"q": "x"})
    assert result.output.a.city == "Rome"
    assert any("city: required, but missing" in s or "city" in s for s in seen[:1])
    assert any("unknown tool 'no_such_tool'" in s for s in seen)
    failed = [e for e in result.events if isinstance(e, ToolCallFinished) and not e.ok]
    assert len(failed) == 2


async def test_invalid_answer_is_repaired_once_then_fails_clearly() -> None:
    class Sequence(ScriptedBackend):
        def __init__(self, answers: list[str]):
            super().__init__()
            self.answers = answers

        async def generate(self, request: LLMRequest):  # type: ignore[no-untyped-def]
            response = await super().generate(request)
            return response.model_copy(update={"content": self.answers.pop(0)})

    g = Graph("repair", inputs={"q": str})
    g.output(a=g.llm("ask", "{q}", output=Weather, inputs={"q": g.input.q}).out)
    ok = await Runtime(
        models={"default": Sequence(["not json", '{"city": "A", "celsius": 2}'])}
    ).run(g, {"q": "?"})
    assert ok.output.a.city == "A"
    bad = await Runtime(models={"default": Sequence(["nope", "still not json"])}).run(
        g, {"q": "?"}, check=False
    )
    assert bad.status == "failed" and "answer does not match Weather" in (bad.error or "")


async def test_turn_limit_with_pending_tool_calls_fails_clearly() -> None:
    rules = [
        ScriptRule(match="loop", tool_calls=[{"name": "get_weather", "arguments": {"city": "A"}}])
    ]

    class Looping(ScriptedBackend):
        async def generate(self, request: LLMRequest):  # type: ignore[no-untyped-def]
            # always asks for the tool again, however many results it already has
            fresh = request.model_copy(update={"messages": [Message(role="user", content="loop")]})
            return await super().generate(fresh)

    g = Graph("limit", inputs={"q": str})
    g.output(
        a=g.llm(
            "ask", "{q}", output=Weather, tools=[get_weather], inputs={"q": g.input.q}, max_turns=3
        ).out
    )
    result = await Runtime(models={"default": Looping(rules)}).run(g, {"q": "loop"}, check=False)
    assert result.status == "failed" and "after 3 turns" in (result.error or "")


async def test_templates_render_typed_inputs_as_json() -> None:
    prompts: list[str] = []

    class Capture(ScriptedBackend):
        async def generate(self, request: LLMRequest):  # type: ignore[no-untyped-def]
            prompts.append(request.messages[-1].content or "")
            return await super().generate(request)

    g = Graph("tpl", inputs={"w": Weather, "n": list[int]})
    g.output(a=g.llm("ask", "W={w} N={n}", inputs={"w": g.input.w, "n": g.input.n}).out)
    await Runtime(models={"default": Capture()}).run(
        g, {"w": {"city": "A", "celsius": 1}, "n": [1, 2]}
    )
    assert prompts == ['W={"city":"A","celsius":1.0} N=[1, 2]']
    assert json.loads(prompts[0].split("N=")[1]) == [1, 2]


async def test_streaming_emits_token_events() -> None:
    from treadle.runtime.core.events import LLMTokens

    g = Graph("stream", inputs={"q": str})
    g.output(a=g.llm("ask", "{q}", inputs={"q": g.input.q}).out)
    rt = Runtime(
        models={"default": ScriptedBackend([ScriptRule(match="hi", content="one two three")])},
        stream_tokens=True,
    )
    result = await rt.run(g, {"q": "hi"})
    assert result.output.a == "one two three"
    assert "".join(e.text for e in result.events if isinstance(e, LLMTokens)) == "one two three"


async def test_streamed_tokens_are_batched() -> None:
    """A hundred pieces that arrive at once: the first goes out alone (it marks the first
    token), the rest together, not as a hundred events."""
    from collections.abc import AsyncIterator

    from treadle.backends.base import StreamChunk, Usage
    from treadle.runtime.core.events import LLMCallFinished, LLMTokens

    class Fast(ScriptedBackend):
        async def stream(self, request: LLMRequest) -> AsyncIterator[StreamChunk]:
            for i in range(100):
                yield StreamChunk(delta=f"{i} ")
            yield StreamChunk(finish_reason="stop", usage=Usage(completion_tokens=100))

    g = Graph("fast", inputs={"q": str})
    g.output(a=g.llm("ask", "{q}", inputs={"q": g.input.q}).out)
    result = await Runtime(models={"default": Fast()}, stream_tokens=True).run(g, {"q": "x"})
    tokens = [e for e in result.events if isinstance(e, LLMTokens)]
    assert "".join(e.text for e in tokens) == "".join(f"{i} " for i in range(100))
    assert tokens[0].text == "0 " and len(tokens) < 10
    finished = next(e for e in result.events if isinstance(e, LLMCallFinished))
    assert tokens[-1].seq < finished.seq


async def test_a_pending_batch_goes_out_when_its_time_is_up() -> None:
    """Text held for a batch is emitted when the batch's time is up, not when the next
    piece (or the answer's end) arrives: a stream that pauses shows what it had."""
    from collections.abc import AsyncIterator

    from treadle.backends.base import StreamChunk, Usage
    from treadle.runtime.core.events import LLMTokens
    from treadle.runtime.core.gateway import TOKEN_BATCH_S

    class Pausing(ScriptedBackend):
        async def stream(self, request: LLMRequest) -> AsyncIterator[StreamChunk]:
            yield StreamChunk(delta="a ")
            yield StreamChunk(delta="b ")  # held: the first event has just gone out
            await anyio.sleep(TOKEN_BATCH_S * 4)  # the stream pauses, the batch's time is up
            yield StreamChunk(delta="c")
            yield StreamChunk(finish_reason="stop", usage=Usage(completion_tokens=3))

    g = Graph("pausing", inputs={"q": str})
    g.output(a=g.llm("ask", "{q}", inputs={"q": g.input.q}).out)
    result = await Runtime(models={"default": Pausing()}, stream_tokens=True).run(g, {"q": "x"})
    assert [e.text for e in result.events if isinstance(e, LLMTokens)] == ["a ", "b ", "c"]


async def test_a_step_before_a_person_says_so_in_its_hints() -> None:
    """The call right before an `ask` carries `human_wait` (a scheduler holds nothing for
    the program while the person thinks); the one after does not."""
    seen: dict[str, bool] = {}

    class Recording(ScriptedBackend):
        async def generate(self, request: LLMRequest) -> LLMResponse:
            assert request.hints is not None
            seen[request.messages[-1].content or ""] = request.hints.human_wait
            return await super().generate(request)

    g = Graph("review", inputs={"q": str})
    draft = g.llm("draft", "Draft {q}", inputs={"q": g.input.q})
    ok = g.ask("approve", "Ship {d}?", output=bool, inputs={"d": draft})
    g.output(a=g.llm("final", "Final {o}", inputs={"o": ok}).out)
    rt = Runtime(models={"default": Recording()})
    first = await rt.run(g, {"q": "x"})
    assert first.status == "waiting"
    await rt.resume(first.run_id, g, input=True)
    assert seen == {"Draft x": True, "Final true": False}
