"""Validation before any run: every problem is found and names the node and field."""

from __future__ import annotations

import enum
from typing import Literal

import pytest
from pydantic import BaseModel

from treadle import ITEM, Graph, GraphValidationError, step, tool


class Point(BaseModel):
    x: int
    y: int


def inc(x: int) -> int:
    return x + 1


def point(v: int) -> Point:
    return Point(x=v, y=v)


def total(xs: list[int]) -> int:
    return sum(xs)


@tool
def lookup(key: str, limit: int = 3) -> list[str]:
    """Look a key up."""
    return [key] * limit


def problems(g: Graph) -> list[str]:
    with pytest.raises(GraphValidationError) as info:
        g.compile()
    return [str(i) for i in info.value.issues]


def test_a_valid_graph_compiles_in_topological_order() -> None:
    g = Graph("ok", inputs={"n": int})
    b = g.func("b", inc, inputs={"x": g.input.n})
    g.func("a", inc, inputs={"x": b})
    cg = g.compile()
    assert cg.order == ("b", "a")
    assert cg.nodes["a"].deps == ("b",)


def test_cycle_is_reported_with_its_path() -> None:
    from treadle.graphs.kinds import FuncNode
    from treadle.graphs.spec import GraphSpec, Ref

    spec = GraphSpec(
        "cyc",
        nodes=[
            FuncNode(id="a", fn=inc, inputs={"x": Ref("c")}),
            FuncNode(id="b", fn=inc, inputs={"x": Ref("a")}),
            FuncNode(id="c", fn=inc, inputs={"x": Ref("b")}),
        ],
    )
    from treadle import compile_graph

    with pytest.raises(GraphValidationError, match=r"cycle: a -> b -> c -> a"):
        compile_graph(spec)


def test_unbound_unknown_and_duplicate_inputs() -> None:
    g = Graph("inputs", inputs={"n": int})
    g.func("unbound", inc, inputs={})
    g.func("unknown", inc, inputs={"x": g.input.n, "y": 1})
    g.func("dup", inc, inputs={"x": g.input.n})
    g.func("dup", inc, inputs={"x": g.input.n})
    found = problems(g)
    assert "node 'unbound', field 'inputs': input 'x' is not bound" in found
    assert "node 'unknown', field 'inputs.y': unknown input 'y' (expected: x)" in found
    assert "node 'dup', field 'id': duplicate node id" in found


def test_type_mismatch_along_an_edge_and_missing_field() -> None:
    g = Graph("types", inputs={"n": int, "s": str})
    p = g.func("p", point, inputs={"v": g.input.n})
    g.func("wrong", total, inputs={"xs": p.out.x})
    g.func("text", inc, inputs={"x": g.input.s})
    g.func("nofield", inc, inputs={"x": p.out.z})
    g.func("ok", inc, inputs={"x": p.out.y})
    found = problems(g)
    # 14.5: the message names the producing node (or graph input) too
    assert any(
        "'wrong'" in f
        and "type mismatch: the output of node 'p' ($p.x) is int, bound to an input of type "
        "list[int]"
        in f
        for f in found
    )
    assert any(
        "'text'" in f and "graph input 's' is str, bound to an input of type int" in f
        for f in found
    )
    assert any("'nofield'" in f and "has no field 'z'" in f for f in found)
    assert not any("'ok'" in f for f in found)


def test_references_to_unknown_nodes_and_inputs() -> None:
    from treadle.graphs.spec import Ref

    g = Graph("refs", inputs={"n": int})
    g.func("a", inc, inputs={"x": Ref("ghost")})
    g.func("b", inc, inputs={"x": g.input.missing})
    found = problems(g)
    assert any("reference to unknown node 'ghost'" in f for f in found)
    assert any("unknown graph input 'missing' (declared: n)" in f for f in found)


def test_item_outside_map_is_an_error_and_map_needs_a_list() -> None:
    g = Graph("items", inputs={"n": int, "xs": list[int]})
    g.func("a", inc, inputs={"x": ITEM})
    g.map("m", g.input.n, step.func(inc, inputs={"x": ITEM}))
    g.map("good", g.input.xs, step.func(inc, inputs={"x": ITEM}))
    found = problems(g)
    assert any("'a'" in f and "$item is only defined inside a map" in f for f in found)
    assert any("'m'" in f and "map needs a list to iterate over, got int" in f for f in found)
    assert not any("'good'" in f for f in found)


def test_unknown_model_alias_and_unused_prompt_input() -> None:
    g = Graph("llm", inputs={"q": str})
    g.llm("a", "Answer {q}", model="gpt-9", inputs={"q": g.input.q})
    g.llm("b", "Answer {q}", inputs={"q": g.input.q, "extra": g.input.q})
    g.llm("c", "Answer {q}", inputs={})
    found = problems(g)
    assert any("unknown model alias 'gpt-9' (known: default)" in f for f in found)
    assert any("'b'" in f and "input 'extra' is not used by the prompt" in f for f in found)
    assert any("'c'" in f and "input 'q' is not bound" in f for f in found)
    # a runtime that provides the alias makes it known
    g2 = Graph("llm2", inputs={"q": str})
    g2.llm("a", "Answer {q}", model="gpt-9", inputs={"q": g2.input.q})
    assert g2.compile(models=["gpt-9"]).models == {"gpt-9"}


def test_tool_node_inputs_follow_the_tool_schema() -> None:
    g = Graph("tools", inputs={"k": str})
    g.tool("ok", lookup, inputs={"key": g.input.k})
    g.tool("bad", lookup, inputs={"key": g.input.k, "limit": "many"})
    found = problems(g)
    assert any(
        "'bad'" in f and "the value 'many', bound to an input of type int" in f for f in found
    )


def test_disconnected_node_is_reported() -> None:
    g = Graph("island", inputs={"n": int})
    g.func("a", inc, inputs={"x": g.input.n})
    g.func("lonely", lambda: 1, inputs={})
    found = problems(g)
    assert any("'lonely'" in f and "not connected" in f for f in found)


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


def test_branch_routes_that_can_never_be_taken() -> None:
    def pick(v: int) -> Literal["small", "big"]:
        return "small" if v < 5 else "big"

    g = Graph("branches", inputs={"n": int, "flag": bool, "c": Color})
    g.func("x", inc, inputs={"x": g.input.n})
    g.branch("b1", {"small": ["x"], "huge": []}, inputs={"v": g.input.n}, route=pick)
    g.branch("b2", {"yes": ["x"]}, inputs={"f": g.input.flag})
    g.branch("b3", {"red": ["x"], "green": ["x"]}, inputs={"c": g.input.c})
    g.branch("b4", {"true": ["ghost"]}, inputs={"f": g.input.flag})
    found = problems(g)
    assert any(
        "'b1'" in f and "route 'huge' can never be taken (possible: big, small)" in f for f in found
    )
    assert any(
        "'b2'" in f and "route 'yes' can never be taken (possible: false, true)" in f for f in found
    )
    assert any("'b3'" in f and "route 'green' can never be taken" in f for f in found)
    assert any("'b4'" in f and "route target 'ghost' is not a node" in f for f in found)


def test_bad_policies() -> None:
    g = Graph("policy", inputs={"n": int})
    g.func("a", inc, inputs={"x": g.input.n}, retries=-1, timeout_s=0, concurrency=0)
    found = problems(g)
    assert any("retries must be >= 0" in f for f in found)
    assert any("timeout_s must be > 0" in f for f in found)
    assert any("concurrency must be >= 1" in f for f in found)


def test_subgraph_errors_are_reported_through_the_parent() -> None:
    inner = Graph("inner", inputs={"v": int})
    inner.func("p", inc, inputs={"x": inner.input.nope})
    outer = Graph("outer", inputs={"v": int})
    outer.subgraph("sub", inner, inputs={"v": outer.input.v})
    found = problems(outer)
    assert any("sub/p" in f and "in subgraph 'inner'" in f for f in found)


def test_every_problem_is_collected_not_only_the_first() -> None:
    g = Graph("many", inputs={"n": int})
    g.func("a", inc, inputs={})
    g.func("b", inc, inputs={"x": g.input.zz})
    g.llm("c", "{q}", model="nope", inputs={"q": g.input.n})
    assert len(problems(g)) >= 3


def test_a_graph_without_nodes_is_invalid() -> None:
    """14.6: `nodes: []` (or an SDK graph with none) is not a program."""
    assert any("at least one node" in p for p in problems(Graph("empty")))


def test_a_fallback_must_fit_the_output_type() -> None:
    """14.6: a fallback of the wrong type is a validation error, not a TypeError later; one
    that fits is converted to the output type (a model, not a dict)."""

    def fails(v: int) -> Point:
        raise RuntimeError("down")

    g = Graph("fb", inputs={"n": int})
    g.func("bad", inc, inputs={"x": g.input.n}, on_error="fallback", fallback="oops")
    g.func("unset", inc, inputs={"x": g.input.n}, on_error="fallback")
    found = problems(g)
    assert any("'bad'" in f and "'fallback'" in f and "'oops'" in f for f in found), found
    assert any("'unset'" in f and "'fallback'" in f for f in found), found

    g = Graph("fb", inputs={"n": int})
    p = g.func("p", fails, inputs={"v": g.input.n}, on_error="fallback", fallback={"x": 1, "y": 2})
    g.output(x=g.func("x", inc, inputs={"x": p.out.x}).out)
    assert g.compile().nodes["p"].fallback == Point(x=1, y=2)
