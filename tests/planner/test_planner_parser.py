"""The plan parser: LLMCompiler's format, streamed at any chunk boundary, every malformed
case, and typed substitution of references."""

from __future__ import annotations

import random

import pytest
from pydantic import BaseModel

from treadle.runtime.nodes.planner.parser import (
    ArgumentResolutionError,
    Join,
    PlanError,
    PlanItem,
    PlanParser,
    Task,
    TaskRef,
    Template,
    Thought,
    resolve_args,
)
from treadle.runtime.nodes.planner.prompts import parse_joiner
from treadle.tools import Tool, calculator, tool


@tool
async def search(query: str) -> str:
    """Search the web."""
    return query


@tool
async def math(problem: str, context: list[str] | None = None) -> float:
    """Solve a math problem."""
    return 0.0


@tool
async def stats(values: list[float], scale: float = 1.0) -> float:
    """Sum values."""
    return sum(values) * scale


class Page(BaseModel):
    title: str
    words: int


@tool
async def fetch(url: str) -> Page:
    """Fetch a page."""
    return Page(title=url, words=3)


TOOLS: dict[str, Tool] = {t.name: t for t in (search, math, stats, fetch, calculator)}

PLAN = """Thought: I need both depths.
1. search("Mariana Trench depth")
2. search(query='Puerto Rico Trench depth')  # a comment
3. math("What is 20% less than $1?", ["$1", $2])
4. stats([$1, ${2}, 3], scale=2)
5. math(
   "multi-line call",
   ["a", "b"])
Thought: I can answer now.
6. join()<END_OF_PLAN>
"""


def parse_streamed(text: str, chunks: list[int] | None = None, **kw: list[int]) -> list[PlanItem]:
    parser = PlanParser(TOOLS, **kw)
    items: list[PlanItem] = []
    pos = 0
    for size in chunks or [len(text)]:
        items += parser.feed(text[pos : pos + size])
        pos += size
    items += parser.feed(text[pos:])
    items += parser.finish()
    return items


def test_whole_plan_is_parsed_in_order() -> None:
    items = parse_streamed(PLAN)
    kinds = [type(i).__name__ for i in items]
    assert kinds == ["Thought", "Task", "Task", "Task", "Task", "Task", "Thought", "Join"]
    t1, t2, t3, t4, t5 = (i for i in items if isinstance(i, Task))
    assert (t1.tool, t1.args, t1.deps) == ("search", {"query": "Mariana Trench depth"}, ())
    assert t2.args == {"query": "Puerto Rico Trench depth"}
    assert t3.deps == (1, 2)
    assert t3.args["problem"] == Template(("What is 20% less than ", TaskRef(1), "?"))
    assert t3.args["context"] == [Template((TaskRef(1),)), TaskRef(2)]
    assert t4.args == {"values": [TaskRef(1), TaskRef(2), 3], "scale": 2}
    assert t5.args == {"problem": "multi-line call", "context": ["a", "b"]}
    assert isinstance(items[-1], Join) and items[-1].idx == 6


@pytest.mark.parametrize("seed", range(25))
def test_any_chunking_gives_the_same_items(seed: int) -> None:
    rng = random.Random(seed)
    chunks = [rng.randint(1, 7) for _ in range(len(PLAN))]
    assert parse_streamed(PLAN, chunks) == parse_streamed(PLAN)


def test_a_task_is_emitted_at_its_closing_parenthesis_before_the_newline() -> None:
    parser = PlanParser(TOOLS)
    assert parser.feed('1. search("x"') == []
    items = parser.feed(")")
    assert [type(i) for i in items] == [Task]
    assert parser.feed("  # trailing comment\n") == []
    (second,) = parser.feed('2. search("y")\n')
    assert isinstance(second, Task) and second.idx == 2


def test_nothing_after_join_is_parsed() -> None:
    items = parse_streamed('1. search("a")\n2. join()\n3. search("b")\n')
    assert [type(i) for i in items] == [Task, Join]


def test_dollar_escapes_and_plain_dollars() -> None:
    items = parse_streamed('1. search("costs $$5 in US$")\n')
    assert isinstance(items[0], Task)
    assert items[0].args == {"query": "costs $5 in US$"}


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('1. nosuch("x")', "unknown tool 'nosuch'"),
        ("1. search()", "missing required argument(s) of search: query"),
        ('1. search("a", "b")', "search takes 1 argument(s) (query), got 2"),
        ('1. search(q="a")', "search has no parameter 'q'"),
        ('1. search("a", query="b")', "argument 'query' is given twice"),
        ("1. search(query=1+2)", "BinOp expressions are not evaluated"),
        ("1. search(query=foo)", "unknown name 'foo'"),
        ('1. search("x") and more', "unexpected text after the call"),
        ("1. search x", "expected a call like 'tool(arguments)'"),
        ('1. search("$2")', "$2 refers to a later task"),
        ("1. search($1)", "$1 refers to this task's own result (a cycle)"),
        ('search("x")', "a task line must start with its id"),
        ('1. search("x"', "the call is not closed before the plan ended"),
    ],
)
def test_malformed_lines_give_clear_errors(line: str, expected: str) -> None:
    items = parse_streamed(line + "\n")
    errors = [i for i in items if isinstance(i, PlanError)]
    assert len(errors) == 1, items
    assert expected in errors[0].message
    assert str(errors[0]).startswith("task 1:" if line.startswith("1.") else "plan:")


def test_references_to_missing_invalid_and_reused_ids() -> None:
    plan = (
        '1. search("a")\n'
        '3. search("$2")\n'  # 2 was never written
        '4. nosuch("x")\n'
        '5. search("$4")\n'  # 4 is invalid
        '5. search("again")\n'  # id used twice
        '2. search("late")\n'  # ids must increase
        '6. search("x"\n'  # not closed, then a new task starts
        '7. search("$1")\n'
    )
    items = parse_streamed(plan)
    messages = [(i.idx, i.message) for i in items if isinstance(i, PlanError)]
    assert messages[0] == (3, "$2 refers to task 2, which does not exist")
    assert messages[1][0] == 4 and "unknown tool" in messages[1][1]
    assert messages[2] == (5, "$4 refers to task 4, which is itself invalid")
    # a reused or decreasing id is not this line's: the error is the plan's
    assert messages[3] == (None, "task id 5 is used twice")
    assert messages[4] == (None, "task ids must increase: 2 comes after 5")
    assert messages[5][0] == 6 and "not closed" in messages[5][1]
    assert [i.idx for i in items if isinstance(i, Task)] == [1, 7]


def test_a_replan_may_refer_to_earlier_rounds() -> None:
    items = parse_streamed('4. search("${2} and $3")\n', known=[1, 2, 3], invalid=[3])
    assert isinstance(items[0], PlanError) and "itself invalid" in items[0].message
    items = parse_streamed('4. search("${2} more")\n', known=[1, 2, 3])
    assert isinstance(items[0], Task) and items[0].deps == (2,)


def test_prose_and_thoughts_are_not_tasks() -> None:
    items = parse_streamed(
        "Here is the plan:\n```\nThought 1: think\n1. search('x')\n```\njoin()\n"
    )
    assert items == [
        Thought("Here is the plan:"),
        Thought("think"),
        items[2],
        Join(None, "join()"),
    ]


# -- substitution ------------------------------------------------------------------------


def task_of(line: str, known: list[int]) -> Task:
    items = parse_streamed(line + "\n", known=known)
    assert isinstance(items[0], Task), items
    return items[0]


def test_typed_substitution_follows_the_schema() -> None:
    t = task_of("9. stats([$1, $2, 3], scale=$3)", [1, 2, 3])
    args = resolve_args(t, {1: "2.5", 2: 4, 3: "0.5"}, stats.parameters_schema)
    assert args == {"values": [2.5, 4, 3], "scale": 0.5}
    assert stats.validate(args).model_dump() == {"values": [2.5, 4.0, 3.0], "scale": 0.5}


def test_a_whole_list_result_fills_a_list_parameter() -> None:
    t = task_of("9. stats($1)", [1])
    assert resolve_args(t, {1: "[1, 2]"}, stats.parameters_schema) == {"values": [1, 2]}
    assert resolve_args(t, {1: [1.5]}, stats.parameters_schema) == {"values": [1.5]}


def test_text_parameters_get_text_and_fields_are_reachable() -> None:
    t = task_of('9. math("words: ${1.words}, all: $1", [$2])', [1, 2])
    args = resolve_args(t, {1: Page(title="t", words=7), 2: 42.0}, math.parameters_schema)
    assert args["problem"] == 'words: 7, all: {"title":"t","words":7}'
    assert args["context"] == ["42.0"]
    t = task_of("9. calculator($1)", [1])
    assert resolve_args(t, {1: 3}, calculator.parameters_schema) == {"expression": "3"}


def test_fields_inside_json_text_results() -> None:
    t = task_of('9. calculator("${1.a} * $2.b")', [1, 2])
    args = resolve_args(t, {1: '{"a": 6}', 2: '{"b": 7}'}, calculator.parameters_schema)
    # `$2.b` inside a string is `$2` followed by text; `${2.b}` is the field
    assert args == {"expression": '6 * {"b": 7}.b'}
    bare = task_of("9. stats([$1.a, $1['b'], $2[0]])", [1, 2])
    args = resolve_args(bare, {1: {"a": 1, "b": 2}, 2: [5]}, stats.parameters_schema)
    assert args == {"values": [1, 2, 5]}


def test_a_missing_field_is_a_clear_error() -> None:
    t = task_of('9. calculator("${1.nope}")', [1])
    with pytest.raises(ArgumentResolutionError, match="has no 'nope'"):
        resolve_args(t, {1: {"a": 1}}, calculator.parameters_schema)


# -- the joiner's answer -----------------------------------------------------------------


def test_joiner_answers() -> None:
    d = parse_joiner("Thought: both are American.\nAction: Finish(yes (both))")
    assert (d.action, d.text, d.thought) == ("finish", "yes (both)", "both are American.")
    d = parse_joiner("Thought: missing data\nAction: Replan(search for K2's height)")
    assert (d.action, d.text) == ("replan", "search for K2's height")
    d = parse_joiner('Action: Finish({"a": 1}\n)')
    assert d.text == '{"a": 1}'
    assert parse_joiner("Thought: easy\n42").text == "42"
