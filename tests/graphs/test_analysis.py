"""Static facts the scheduler uses: steps ahead, last LLM step, next tools, prefix groups,
critical path."""

from __future__ import annotations

from pydantic import BaseModel

from treadle import ITEM, Graph, step, tool
from treadle.graphs.render import to_dot, to_mermaid


@tool(expected_duration_s=5.0)
def slow_search(query: str) -> str:
    """Search slowly."""
    return query


@tool(expected_duration_s=0.1)
def fast_calc(expression: str) -> str:
    """Calculate."""
    return expression


class Plan(BaseModel):
    queries: list[str]


def agent() -> Graph:
    g = Graph("agent", inputs={"q": str})
    plan = g.llm(
        "plan", "Plan searches for {q}", system="You plan.", output=Plan, inputs={"q": g.input.q}
    )
    search = g.map("search", plan.out.queries, step.tool(slow_search, inputs={"query": ITEM}))
    calc = g.tool("calc", fast_calc, inputs={"expression": g.input.q})
    draft = g.llm("draft", "Draft from {hits}", system="You write.", inputs={"hits": search})
    check = g.llm("check", "Check {c}", system="You write.", inputs={"c": calc})
    final = g.llm(
        "final", "Combine {d} and {c}", system="You write.", inputs={"d": draft, "c": check}
    )
    g.output(answer=final.out)
    return g


def test_steps_to_execution_and_last_step() -> None:
    facts = agent().compile().facts.llm
    assert facts["plan"].steps_to_execution == 2  # draft, final
    assert facts["draft"].steps_to_execution == 1
    assert facts["check"].steps_to_execution == 1
    assert facts["final"].steps_to_execution == 0
    assert [n for n, f in facts.items() if f.is_last_llm_step] == ["final"]


def test_next_tools_and_prefix_groups() -> None:
    facts = agent().compile().facts
    assert facts.llm["plan"].next_tools == ("slow_search",)
    assert facts.llm["final"].next_tools == ()
    # draft and check share model + system prompt but their templates start differently
    assert facts.llm["draft"].prefix_group != facts.llm["check"].prefix_group
    g = Graph("shared", inputs={"a": str})
    x = g.llm("x", "Summarise: {a}", system="S", inputs={"a": g.input.a})
    g.llm("y", "Summarise: {b}", system="S", inputs={"b": x})
    groups = g.compile().facts.prefix_groups
    assert ("x", "y") in groups.values()


def test_critical_path_follows_the_expensive_branch() -> None:
    facts = agent().compile().facts
    # the slow search (5 s) outweighs the fast calc (0.1 s)
    assert facts.critical_path == ("plan", "search", "draft", "final")
    assert facts.remaining_cost_s["plan"] > facts.remaining_cost_s["calc"]
    assert facts.critical_path_cost_s == facts.remaining_cost_s["plan"]


def test_rendering_names_every_node_and_edge() -> None:
    spec = agent().spec
    mermaid = to_mermaid(spec)
    assert mermaid.startswith("flowchart TD")
    for node in ("plan", "search", "calc", "draft", "check", "final"):
        assert f"  {node}" in mermaid
    assert 'plan -->|"queries→over"| search' in mermaid
    dot = to_dot(spec)
    assert '"search" -> "draft" [label="hits"];' in dot
    assert dot.strip().endswith("}")


def test_a_person_asked_right_after_a_step_is_a_human_wait() -> None:
    g = Graph("review", inputs={"q": str})
    draft = g.llm("draft", "Draft {q}", inputs={"q": g.input.q})
    ok = g.ask("approve", "Ship {d}?", output=bool, inputs={"d": draft})
    both = g.llm("both", "Draft again {q}", inputs={"q": g.input.q})
    ask2 = g.ask("confirm", "Sure about {b}?", output=bool, inputs={"b": both})
    side = g.llm("side", "Note {b}", inputs={"b": both})  # `both` is followed by a step too
    final = g.llm("final", "Ship {o} {c} {s}", inputs={"o": ok, "c": ask2, "s": side})
    g.output(answer=final.out)
    facts = g.compile().facts.llm
    assert facts["draft"].human_wait_next  # only the ask follows it
    assert not facts["both"].human_wait_next  # the program goes on with `side` meanwhile
    assert not facts["side"].human_wait_next and not facts["final"].human_wait_next
