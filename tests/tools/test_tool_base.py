"""`@tool` / `Tool`: schemas from signatures and docstrings, validation, limits, stats."""

import logging
import threading
import warnings
from typing import Annotated, Literal

import anyio
import pytest
from anyio import wait_all_tasks_blocked
from pydantic import BaseModel, Field

from treadle.tools import Tool, ToolArgumentError, ToolError, ToolTimeout, tool

# -- schema --------------------------------------------------------------------------------


class Point(BaseModel):
    x: float
    y: float = 0.0


class Region(BaseModel):
    """A named area."""

    name: str
    corners: list[Point]


@tool(timeout_s=3.0, expected_duration_s=0.2, idempotent=False, max_concurrency=4)
def search_region(
    query: str,
    region: Region,
    limit: Annotated[int, Field(ge=1, le=50)] = 10,
    mode: Literal["fast", "exact"] = "fast",
    near: Point | None = None,
    idempotency_key: str | None = None,
) -> list[str]:
    """Search for places inside a region.

    Results are ranked by distance
    to the region's centre.

    Args:
        query: What to look for.
        region: The area to search in; its corners
            default: the whole map when empty.
        limit (int): How many results to return at most.
        mode: Speed or precision.
        near: Optional point to rank by.

    Returns:
        The names of the places found.
    """
    return [query]


def test_openai_schema_from_signature_and_docstring() -> None:
    schema = search_region.openai_schema()
    assert schema["type"] == "function"
    fn = schema["function"]
    assert fn["name"] == "search_region"
    # summary and the extended description, but nothing from the Returns section
    assert fn["description"] == (
        "Search for places inside a region.\n\n"
        "Results are ranked by distance to the region's centre."
    )
    params = fn["parameters"]
    assert params["type"] == "object"
    assert params["additionalProperties"] is False
    assert params["required"] == ["query", "region"]
    props = params["properties"]
    assert list(props) == ["query", "region", "limit", "mode", "near"]  # no idempotency_key
    assert props["query"] == {"type": "string", "description": "What to look for."}
    # a deeper-indented continuation line is text, even if it looks like `name: ...`
    assert props["region"]["description"] == (
        "The area to search in; its corners default: the whole map when empty."
    )
    assert props["limit"]["default"] == 10
    assert props["limit"]["minimum"] == 1 and props["limit"]["maximum"] == 50
    assert props["limit"]["description"] == "How many results to return at most."
    assert props["mode"]["enum"] == ["fast", "exact"]
    assert props["mode"]["default"] == "fast"
    # nested pydantic models are described through $defs
    defs = params["$defs"]
    assert set(defs) == {"Point", "Region"}
    assert defs["Region"]["required"] == ["name", "corners"]
    assert defs["Region"]["properties"]["corners"]["items"] == {"$ref": "#/$defs/Point"}
    assert defs["Point"]["properties"]["y"]["default"] == 0.0
    # pydantic's auto titles are dropped everywhere...
    assert "title" not in params and "title" not in props["limit"]
    assert "title" not in defs["Point"]["properties"]["x"]


def test_a_property_named_title_survives_title_stripping() -> None:
    @tool
    def make_doc(title: str, meta: dict[str, str] | None = None) -> str:
        return title

    params = make_doc.parameters_schema
    assert params["required"] == ["title"]
    assert params["properties"]["title"] == {"type": "string"}


def test_declared_attributes() -> None:
    assert search_region.name == "search_region"
    assert search_region.timeout_s == 3.0
    assert search_region.expected_duration_s == 0.2
    assert search_region.idempotent is False
    assert search_region.max_concurrency == 4
    assert search_region.is_async is False
    assert search_region.takes_idempotency_key is True
    assert search_region.output_type == list[str]


def test_name_and_description_overrides_and_bad_declarations() -> None:
    @tool(name="lookup-v2", description="Look something up.")
    async def lookup(key: str) -> str:
        """Ignored summary."""
        return key

    assert lookup.name == "lookup-v2"
    assert lookup.openai_schema()["function"]["description"] == "Look something up."
    assert lookup.is_async

    def f(x: int) -> int:
        return x

    with pytest.raises(ValueError, match="not a valid function name"):
        Tool(f, name="has space")
    with pytest.raises(ValueError, match="max_concurrency"):
        Tool(f, max_concurrency=0)
    with pytest.raises(ValueError, match="timeout_s"):
        Tool(f, timeout_s=0)

    def variadic(*args: int) -> int:
        return 0

    with pytest.raises(TypeError, match=r"\*args"):
        Tool(variadic)


def test_parameter_names_that_shadow_basemodel_attributes() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")

        @tool
        def check(json: str, schema: str = "v1") -> str:
            return f"{json}/{schema}"

    assert check.parameters_schema["required"] == ["json"]
    assert anyio.run(check.invoke, {"json": "{}", "schema": "v2"}) == "{}/v2"


# -- calling --------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_sync_tool_runs_in_a_worker_thread_with_parsed_arguments() -> None:
    seen: dict[str, object] = {}

    @tool
    def area(region: Region, scale: float = 1.0) -> float:
        seen["thread"] = threading.get_ident()
        seen["region"] = region
        xs = [c.x for c in region.corners]
        return (max(xs) - min(xs)) * scale

    result = await area.invoke(
        '{"region": {"name": "r", "corners": [{"x": 1}, {"x": 4, "y": 2}]}, "scale": 2}'
    )
    assert result == 6.0
    assert isinstance(seen["region"], Region)  # nested args arrive as models
    assert seen["thread"] != threading.get_ident()


@pytest.mark.anyio
async def test_async_tool_and_call_by_keywords() -> None:
    @tool
    async def add(a: int, b: int = 2) -> int:
        await anyio.sleep(0)
        return a + b

    assert await add.invoke({"a": 1}) == 3
    assert await add(a=1, b=5) == 6
    assert await add.invoke('{"a": "7"}') == 9  # lax JSON-mode coercion of a numeric string


# -- argument errors ----------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ({}, "a: required, but missing"),
        ({"a": "seven"}, "a: Input should be a valid integer"),
        ({"a": 1, "c": 3}, "c: unexpected (not in the schema)"),
        ('{"a": 1,', "arguments are not valid JSON"),
        ("[1, 2]", "arguments must be a JSON object"),
        ({"a": 1, "p": {"y": 1}}, "p.x: required, but missing"),
        ({"a": 1, "idempotency_key": "k"}, "idempotency_key: unexpected"),
    ],
)
async def test_argument_errors_are_clear_and_nothing_is_called(
    arguments: object, expected: str
) -> None:
    calls: list[int] = []

    @tool
    def pick(a: int, p: Point | None = None, idempotency_key: str | None = None) -> int:
        calls.append(a)
        return a

    with pytest.raises(ToolArgumentError) as info:
        await pick.invoke(arguments)
    assert info.value.tool == "pick"
    assert expected in info.value.reason
    assert str(info.value).startswith("tool 'pick': ")
    assert calls == []
    assert pick.stats.calls == 0  # a refused call is not a measured call


def test_wrong_type_message_shows_the_value() -> None:
    @tool
    def f(n: int) -> int:
        return n

    with pytest.raises(ToolArgumentError, match=r"n: .*valid integer.*\(got 'abc'\)"):
        f.validate({"n": "abc"})


# -- failures -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_exceptions_are_wrapped_into_tool_errors_naming_the_tool() -> None:
    @tool
    def explode(x: int) -> int:
        raise ValueError(f"bad x {x}")

    with pytest.raises(ToolError) as info:
        await explode.invoke({"x": 3})
    assert type(info.value) is ToolError
    assert info.value.tool == "explode"
    assert info.value.reason == "ValueError: bad x 3"
    assert "explode" in str(info.value)
    assert isinstance(info.value.__cause__, ValueError)


@pytest.mark.anyio
async def test_tool_errors_raised_by_the_tool_pass_through() -> None:
    @tool
    async def picky(x: int) -> int:
        raise ToolError("picky", "x must be even")

    with pytest.raises(ToolError, match="x must be even") as info:
        await picky.invoke({"x": 3})
    assert info.value.reason == "x must be even"


@pytest.mark.anyio
async def test_async_timeout() -> None:
    @tool(timeout_s=0.05)
    async def hang() -> None:
        await anyio.Event().wait()

    with pytest.raises(ToolTimeout) as info:
        await hang.invoke({})
    assert info.value.tool == "hang"
    assert "timed out after 0.05 s" in info.value.reason
    assert hang.stats.calls == 1 and hang.stats.failures == 1


@pytest.mark.anyio
async def test_sync_timeout_does_not_wait_for_the_thread() -> None:
    release = threading.Event()
    finished = threading.Event()

    @tool(timeout_s=0.05)
    def block() -> None:
        release.wait(timeout=30)
        finished.set()

    with pytest.raises(ToolTimeout):
        await block.invoke({})
    # the call returned while the thread was still blocked: the deadline did not wait
    assert not finished.is_set()
    release.set()
    assert finished.wait(timeout=30)


@pytest.mark.anyio
async def test_a_timeout_error_raised_by_the_tool_is_not_our_timeout() -> None:
    @tool(timeout_s=30)
    async def own_timeout() -> None:
        raise TimeoutError("upstream socket timed out")

    with pytest.raises(ToolError) as info:
        await own_timeout.invoke({})
    assert not isinstance(info.value, ToolTimeout)
    assert info.value.reason == "TimeoutError: upstream socket timed out"


# -- concurrency ----------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(("limit", "expected_peak"), [(2, 2), (None, 6)])
async def test_max_concurrency_is_enforced_for_async_tools(
    limit: int | None, expected_peak: int
) -> None:
    active = 0
    peak = 0
    done = 0
    gate = anyio.Event()

    @tool(max_concurrency=limit)
    async def work(i: int) -> int:
        nonlocal active, peak, done
        active += 1
        peak = max(peak, active)
        await gate.wait()
        active -= 1
        done += 1
        return i

    async with anyio.create_task_group() as tg:
        for i in range(6):
            tg.start_soon(work.invoke, {"i": i})
        # every task has run as far as it can: the others are queued on the limiter
        await wait_all_tasks_blocked()
        assert active == expected_peak
        gate.set()
    assert peak == expected_peak
    assert done == 6
    assert work.stats.calls == 6


@pytest.mark.anyio
async def test_max_concurrency_is_enforced_for_sync_tools() -> None:
    lock = threading.Lock()
    counts = {"active": 0, "peak": 0, "done": 0}
    gate = threading.Event()

    @tool(max_concurrency=3)
    def work(i: int) -> int:
        with lock:
            counts["active"] += 1
            counts["peak"] = max(counts["peak"], counts["active"])
        gate.wait(timeout=30)
        with lock:
            counts["active"] -= 1
            counts["done"] += 1
        return i

    async with anyio.create_task_group() as tg:
        for i in range(8):
            tg.start_soon(work.invoke, {"i": i})
        with anyio.fail_after(30):
            while counts["active"] < 3:
                await anyio.sleep(0.005)
        await wait_all_tasks_blocked()
        await anyio.sleep(0.05)  # room for a fourth thread to (wrongly) start
        assert counts["active"] == 3
        gate.set()
    assert counts == {"active": 0, "peak": 3, "done": 8}


# -- durations and observers ----------------------------------------------------------------


@pytest.mark.anyio
async def test_durations_are_recorded_and_observers_called_on_success_and_failure() -> None:
    events: list[tuple[str, float, bool]] = []

    @tool(timeout_s=0.05)
    async def flaky(mode: str) -> str:
        if mode == "fail":
            raise RuntimeError("nope")
        if mode == "hang":
            await anyio.Event().wait()
        await anyio.sleep(0.01)
        return mode

    def observe(name: str, duration_s: float, ok: bool) -> None:
        events.append((name, duration_s, ok))

    flaky.add_observer(observe)
    flaky.add_observer(observe)  # registering twice does not double-report
    assert await flaky.invoke({"mode": "ok"}) == "ok"
    with pytest.raises(ToolError):
        await flaky.invoke({"mode": "fail"})
    with pytest.raises(ToolTimeout):
        await flaky.invoke({"mode": "hang"})
    with pytest.raises(ToolArgumentError):
        await flaky.invoke({})  # refused before the call: not measured

    assert [(name, ok) for name, _, ok in events] == [
        ("flaky", True),
        ("flaky", False),
        ("flaky", False),
    ]
    assert events[0][1] >= 0.01  # the ok call slept at least that long
    assert all(d >= 0 for _, d, _ in events)
    stats = flaky.stats
    assert stats.calls == 3 and stats.failures == 2
    assert list(stats.recent) == [d for _, d, _ in events]
    assert stats.mean_s == pytest.approx(sum(d for _, d, _ in events) / 3)

    flaky.remove_observer(observe)
    await flaky.invoke({"mode": "ok"})
    assert len(events) == 3
    assert flaky.stats.calls == 4


@pytest.mark.anyio
async def test_a_failing_observer_is_logged_and_does_not_change_the_result(
    caplog: pytest.LogCaptureFixture,
) -> None:
    @tool
    async def echo(x: int) -> int:
        return x

    def broken(name: str, duration_s: float, ok: bool) -> None:
        raise RuntimeError("metrics backend down")

    echo.add_observer(broken)
    with caplog.at_level(logging.ERROR, logger="treadle.tools.base"):
        assert await echo.invoke({"x": 5}) == 5
    assert "duration observer" in caplog.text and "metrics backend down" in caplog.text


# -- idempotency keys -------------------------------------------------------------------------


@pytest.mark.anyio
async def test_idempotency_key_is_passed_through() -> None:
    @tool(idempotent=False)
    async def charge(amount: int, idempotency_key: str | None = None) -> str:
        return f"{amount}:{idempotency_key}"

    @tool(idempotent=False)
    def charge_sync(amount: int, idempotency_key: str | None = None) -> str:
        return f"{amount}:{idempotency_key}"

    @tool
    def plain(amount: int) -> int:
        return amount

    assert charge.takes_idempotency_key and not plain.takes_idempotency_key
    assert "idempotency_key" not in charge.parameters_schema["properties"]
    assert await charge.invoke({"amount": 5}, idempotency_key="run1/node3/0") == "5:run1/node3/0"
    assert await charge_sync.invoke({"amount": 6}, idempotency_key="k") == "6:k"
    assert await charge.invoke({"amount": 7}) == "7:None"
    # a tool that does not take a key is called without one
    assert await plain.invoke({"amount": 8}, idempotency_key="ignored") == 8
