"""Workflow files: loading to the SDK's GraphSpec, positions, and every kind of mistake."""

from __future__ import annotations

import importlib
import json
import sys
import typing
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, Optional

import pytest
from pydantic import BaseModel

from treadle.graphs.files.loader import (
    WorkflowFileError,
    load_workflow,
    load_workflow_text,
    parse_type,
    workflow_json_schema,
)
from treadle.graphs.files.schema import FILE_KINDS
from treadle.graphs.files.typeref import TypeRefError
from treadle.graphs.kinds import (
    NODE_KINDS,
    BranchNode,
    FuncNode,
    LLMNode,
    MapNode,
    PlannerNode,
    SubgraphNode,
    ToolNode,
)
from treadle.graphs.spec import INPUT, ITEM, FirstOf, GraphSpec, InputSpec, NodeOptions, Ref

FILES = Path(__file__).parent / "files"


@pytest.fixture
def helpers(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The module the sample files name as `wf_helpers:...` (the same object they get)."""
    monkeypatch.syspath_prepend(str(FILES))
    return importlib.import_module("wf_helpers")


def load_error(text: str, *, fmt: Literal["yaml", "json"] = "yaml") -> WorkflowFileError:
    filename = f"flow.{fmt}"
    with pytest.raises(WorkflowFileError) as info:
        load_workflow_text(text, filename=filename, base_dir=FILES, fmt=fmt)
    return info.value


def assert_at(err: WorkflowFileError, line: int, col: int, field: str, *words: str) -> None:
    """The message is FILE:LINE:COL: FIELD: WHAT and the attributes agree with it."""
    file = err.file
    assert (err.line, err.col, err.field) == (line, col, field), str(err)
    assert str(err).startswith(f"{file}:{line}:{col}: {field}: "), str(err)
    for word in words:
        assert word in err.problem, str(err)


HEAD = "name: g\nnodes:\n"


# -- well-formed files -----------------------------------------------------------------


def test_research_yaml_equals_the_graph_built_by_hand(helpers: ModuleType) -> None:
    spec = load_workflow(FILES / "research.yaml")
    verdict = spec.node("validate").output  # inline type; checked on its own below
    assert verdict.__name__ == "Verdict"
    summarize = GraphSpec(
        name="summarize",
        inputs={"text": InputSpec(Any), "style": InputSpec(str, "brief")},
        nodes=[
            LLMNode(
                id="summarize",
                prompt="Summarize in a {style} style: {text}",
                inputs={"text": Ref(INPUT, ("text",)), "style": Ref(INPUT, ("style",))},
            )
        ],
        outputs={"summary": Ref("summarize")},
    )
    repair = GraphSpec(
        name="repair",
        inputs={"text": InputSpec(str)},
        nodes=[FuncNode(id="fix", fn=helpers.repair_text, inputs={"text": Ref(INPUT, ("text",))})],
        outputs={"summary": Ref("fix")},
    )
    expected = GraphSpec(
        name="research",
        description="Research agent",
        inputs={"question": InputSpec(str), "max_hits": InputSpec(int, 3)},
        models={
            "default": {"backend": "scripted"},
            "judge": {"backend": "scripted", "temperature": 0},
        },
        outputs={"report": Ref("final"), "hits": Ref("search")},
        nodes=[
            LLMNode(
                id="plan",
                model="default",
                system="You plan web research.",
                prompt="Write three search queries for: {question}",
                output=helpers.Queries,
                tools=(helpers.lookup,),
                inputs={"question": Ref(INPUT, ("question",))},
                options=NodeOptions(retries=2, timeout_s=30),
            ),
            MapNode(
                id="search",
                over=Ref("plan", ("queries",)),
                options=NodeOptions(concurrency=4),
                node=ToolNode(
                    id="search",
                    tool=helpers.search_docs,
                    inputs={"query": Ref(ITEM), "top_k": Ref(INPUT, ("max_hits",))},
                    options=NodeOptions(on_error="skip"),
                ),
                reduce=helpers.merge_hits,
            ),
            LLMNode(
                id="validate",
                model="judge",
                prompt="Are these hits relevant to {question}? {hits}",
                output=verdict,
                max_turns=2,
                temperature=0.0,
                inputs={"question": Ref(INPUT, ("question",)), "hits": Ref("search")},
            ),
            BranchNode(
                id="check",
                inputs={"ok": Ref("validate", ("valid",))},
                routes={"true": ("execute",), "false": ("repair",)},
                default="false",
            ),
            SubgraphNode(
                id="execute",
                graph=summarize,
                inputs={"text": Ref("search"), "style": "brief"},
            ),
            SubgraphNode(id="repair", graph=repair, inputs={"text": "$ no hits"}),
            FuncNode(
                id="final",
                fn=helpers.format_answer,
                blocking=True,
                options=NodeOptions(on_error="fallback", fallback="no answer"),
                inputs={
                    "summary": FirstOf((Ref("execute", ("summary",)), Ref("repair", ("summary",)))),
                    "question": Ref(INPUT, ("question",)),
                },
            ),
        ],
    )
    assert spec == expected


def test_yaml_and_json_load_to_equal_specs() -> None:
    from_yaml = load_workflow(FILES / "research.yaml")
    from_json = load_workflow(FILES / "research.json")
    assert from_json == from_yaml
    assert load_workflow(str(FILES / "research.yaml")) == from_yaml  # and again: stable
    assert from_json.source is not None and from_json.source.pos.file.endswith("research.json")


def test_inline_types_become_pydantic_models() -> None:
    spec = load_workflow_text(
        """
name: typed
types:
  Hit:
    url: str
    score: {type: float, default: 0.0, description: Relevance}
  Report:
    hits: list[Hit]
    best: Hit | None
    verdict: "Literal['good', 'bad']"
nodes:
  - {id: a, kind: llm, prompt: p, output: Report}
  - {id: b, kind: llm, prompt: p, output: Report}
  - {id: c, kind: llm, prompt: p, output: "list[Hit]"}
""",
        base_dir=FILES,
    )
    report: Any = spec.node("a").output
    assert issubclass(report, BaseModel) and report.__name__ == "Report"
    assert spec.node("b").output is report  # two references, one class
    hit: Any = typing.get_args(spec.node("c").output)[0]
    fields = report.model_fields
    assert fields["hits"].annotation == list[hit]
    assert fields["best"].annotation == (hit | None)
    assert fields["verdict"].annotation == Literal["good", "bad"]
    assert all(f.is_required() for f in fields.values())
    assert not hit.model_fields["score"].is_required()
    assert hit.model_fields["score"].description == "Relevance"
    inline_sub = load_workflow_text(
        "name: outer\ntypes:\n  Hit: {url: str}\nnodes:\n  - id: s\n    kind: subgraph\n"
        "    graph:\n      nodes: [{id: a, kind: llm, prompt: p, output: Hit}]\n"
        "  - {id: b, kind: llm, prompt: p, output: Hit}\n",
    )
    sub_graph: Any = inline_sub.node("s").graph
    outer_hit: Any = inline_sub.node("b").output
    assert sub_graph.name == "s"  # an inline graph is named after its node
    assert sub_graph.node("a").output is outer_hit  # the parent's types are inherited
    assert list(outer_hit.model_fields) == ["url"]
    value = report.model_validate({"hits": [{"url": "u"}], "best": None, "verdict": "good"})
    assert value.hits[0].score == 0.0
    with pytest.raises(ValueError):
        report.model_validate({"hits": [], "best": None, "verdict": "meh"})


def test_first_of_escapes_and_literals() -> None:
    spec = load_workflow_text(
        HEAD
        + """  - id: f
    kind: func
    fn: wf_helpers:format_answer
    inputs:
      summary: {first_of: [$a, $b.text.0, $item]}
      question: "$$5 and $x"
      nested: {price: $$9, list: [1, "two", $$three], n: null}
""",
        base_dir=FILES,
    )
    inputs = spec.node("f").inputs
    assert inputs["summary"] == FirstOf((Ref("a"), Ref("b", ("text", "0")), Ref(ITEM)))
    assert inputs["question"] == "$5 and $x"
    assert inputs["nested"] == {"price": "$9", "list": [1, "two", "$three"], "n": None}


def test_subgraph_from_a_relative_file_keeps_its_own_positions() -> None:
    spec = load_workflow(FILES / "research.yaml")
    sub = spec.node("execute")
    assert isinstance(sub, SubgraphNode) and sub.graph is not None
    assert sub.graph.name == "summarize"
    inner = sub.graph.node("summarize")
    assert inner.source is not None
    assert inner.source.pos.file == str(FILES / "sub" / "summarize.yaml")
    assert (inner.source.at("prompt").line, inner.source.at("prompt").col) == (8, 13)


def test_source_positions_of_nodes_and_fields() -> None:
    spec = load_workflow(FILES / "research.yaml")
    assert spec.source is not None and spec.source.pos.line == 2
    assert spec.source.at("outputs.report").line == 15
    plan = spec.node("plan").source
    assert plan is not None
    assert (plan.pos.line, plan.pos.col) == (18, 5)
    assert (plan.at("prompt").line, plan.at("prompt").col) == (22, 13)
    assert (plan.at("inputs.question").line, plan.at("inputs.question").col) == (25, 24)
    assert (plan.at("tools.0").line, plan.at("tools.0").col) == (24, 13)
    assert plan.at("inputs.nothing") == plan.at("inputs")  # falls back to the parent
    search = spec.node("search")
    assert isinstance(search, MapNode) and search.node is not None
    assert search.source is not None and search.node.source is not None
    assert search.source.at("node").line == 33
    assert search.source.at("node.tool").line == 34
    assert search.node.source.at("tool").line == 34
    assert search.node.source.at("node.inputs.top_k").col == 37  # as compile.py asks
    check = spec.node("check").source
    assert check is not None
    assert check.at("routes.true").line == 50 and check.at("routes.false").line == 51
    final = spec.node("final").source
    assert final is not None and final.at("inputs.summary.1").col == 46


def test_json_positions() -> None:
    text = json.dumps({"name": "j", "nodes": [{"id": "a", "kind": "func", "fn": "x"}]}, indent=2)
    err = load_error(text, fmt="json")
    # "fn": "x" is on line 7, the value starts in column 13
    assert_at(err, 7, 13, "nodes[a].fn", "import path")


def test_json_that_ruamel_cannot_read_still_loads() -> None:
    # YAML limits implicit keys to 1024 characters; JSON does not. The content comes from
    # `json`, only the positions are lost (errors then point at 1:1).
    long_key = "k" * 1100
    doc = {"name": "j", "models": {"default": {long_key: 1}}}
    spec = load_workflow_text(json.dumps(doc), fmt="json")
    assert spec.models == {"default": {long_key: 1}}
    err = load_error(json.dumps({**doc, "nodes": [{"id": "a", "kind": "llm"}]}), fmt="json")
    assert_at(err, 1, 1, "nodes[a].prompt", "missing")


def test_builtin_tools_by_name(helpers: ModuleType) -> None:
    text = HEAD + "  - {id: a, kind: llm, prompt: p, tools: [calculator, 'wf_helpers:lookup']}\n"
    try:
        from treadle.tools.builtins import BUILTINS
    except ImportError:  # built-ins not written yet: the name must fail clearly instead
        assert_at(load_error(text), 3, 43, "nodes[a].tools[0]", "not available")
        return
    spec = load_workflow_text(text, base_dir=FILES)
    node: Any = spec.node("a")
    assert node.tools == (BUILTINS["calculator"], helpers.lookup)


def test_schema_key_and_bool_route_labels_are_accepted() -> None:
    spec = load_workflow_text(
        '{"$schema": "workflow.schema.json", "name": "b", "nodes": [{"id": "c", "kind": '
        '"branch", "inputs": {"x": 1}, "routes": {"1": ["d"]}, "route": "wf_helpers:choose"}]}',
        base_dir=FILES,
        fmt="json",
    )
    node = spec.node("c")
    assert isinstance(node, BranchNode) and node.routes == {"1": ("d",)}
    yaml_spec = load_workflow_text(
        HEAD + "  - {id: c, kind: branch, inputs: {x: 1}, routes: {1: [d]}, "
        "route: 'wf_helpers:choose'}\n",
        base_dir=FILES,
    )
    assert yaml_spec.node("c") == node


# -- malformed files: each error names file, line, column and field ---------------------


def test_yaml_syntax_error() -> None:
    err = load_error("name: g\nnodes: [\n  {id: a\n")
    assert err.file == "flow.yaml"
    assert err.field == "(document)" and err.line >= 3
    assert str(err).startswith(f"flow.yaml:{err.line}:{err.col}: (document): YAML syntax error")


def test_json_syntax_error() -> None:
    assert_at(
        load_error('{\n  "name": "g",\n  "nodes": [,]\n}', fmt="json"),
        3,
        13,
        "(document)",
        "JSON syntax error",
    )


def test_top_level_not_a_mapping() -> None:
    assert_at(load_error("- id: a\n- id: b\n"), 1, 1, "(document)", "must be a mapping", "a list")
    assert_at(load_error("# nothing\n"), 1, 1, "(document)", "empty document")


def test_missing_name() -> None:
    assert_at(load_error("description: x\nnodes: []\n"), 1, 1, "name", "missing")


def test_missing_id() -> None:
    err = load_error(HEAD + "  - kind: func\n    fn: wf_helpers:repair_text\n")
    assert_at(err, 3, 5, "nodes[0].id", "missing")


def test_duplicate_node_id() -> None:
    text = HEAD + "  - {id: a, kind: func, fn: 'wf_helpers:repair_text'}\n" * 2
    assert_at(load_error(text), 4, 10, "nodes[1].id", "duplicate node id 'a'", "line 3")


def test_unknown_kind_suggests_the_closest() -> None:
    err = load_error(HEAD + "  - id: a\n    kind: lm\n    prompt: hi\n")
    assert_at(err, 4, 11, "nodes[a].kind", "unknown kind 'lm'", "did you mean 'llm'")
    err = load_error(HEAD + "  - id: a\n    prompt: hi\n")
    assert_at(err, 3, 5, "nodes[a].kind", "missing", "llm")


def test_unknown_field_suggests_the_closest() -> None:
    err = load_error(HEAD + "  - id: a\n    kind: llm\n    promt: hi\n")
    # reported at the key, and before the "missing prompt" it causes
    assert_at(err, 5, 5, "nodes[a].promt", "unknown field 'promt'", "did you mean 'prompt'")
    err = load_error("name: g\ninputs:\n  q: {type: int, defualt: 3}\n")
    assert_at(err, 3, 18, "inputs.q.defualt", "did you mean 'default'")
    err = load_error("name: g\ninputs:\n  2q: str\n")
    assert_at(err, 3, 3, "inputs.2q", "'2q' is not an identifier")


def test_wrong_field_type() -> None:
    err = load_error(HEAD + "  - id: a\n    kind: llm\n    prompt: p\n    retries: two\n")
    assert_at(err, 6, 14, "nodes[a].retries", "expected an integer", "'two'")
    err = load_error(HEAD + '  - {id: a, kind: llm, prompt: p, retries: "2"}\n')
    assert_at(err, 3, 44, "nodes[a].retries", "expected an integer", "'2'")
    err = load_error(HEAD + "  - {id: a, kind: llm, prompt: p, jitter: 3}\n")
    assert_at(err, 3, 43, "nodes[a].jitter", "less than or equal to 1")


@pytest.mark.parametrize(
    ("ref", "words"),
    [
        ("$", ("empty reference",)),
        ("$a..b", ("empty name between dots",)),
        ("$a.", ("empty name",)),
        ("$1a", ("not a node id",)),
        ("$a.b c", ("not a field name",)),
    ],
)
def test_bad_reference_syntax(ref: str, words: tuple[str, ...]) -> None:
    err = load_error(
        HEAD + f"  - id: a\n    kind: llm\n    prompt: p\n    inputs: {{x: '{ref}'}}\n"
    )
    assert_at(err, 6, 17, "nodes[a].inputs.x", *words)


def test_references_only_as_whole_values() -> None:
    err = load_error(HEAD + "  - id: a\n    kind: llm\n    prompt: p\n    inputs: {x: [1, $b]}\n")
    assert_at(err, 6, 21, "nodes[a].inputs.x[1]", "whole input value")
    err = load_error(HEAD + "  - {id: a, kind: llm, prompt: p, inputs: {x: {first_of: [$b, 3]}}}\n")
    assert_at(err, 3, 63, "nodes[a].inputs.x.first_of[1]", "expected a reference")


def test_unknown_type_name() -> None:
    err = load_error(
        "name: g\ntypes:\n  Queries: {q: str}\nnodes:\n  - {id: a, kind: llm, prompt: p, "
        "output: Querys}\n"
    )
    assert_at(err, 5, 43, "nodes[a].output", "unknown type 'Querys'", "did you mean 'Queries'")
    err = load_error("name: g\ninputs:\n  q: {type: 'list[strr]'}\n")
    assert_at(err, 3, 13, "inputs.q.type", "unknown type 'strr'", "did you mean 'str'")


def test_import_path_problems() -> None:
    err = load_error(HEAD + "  - {id: a, kind: func, fn: 'no_such_module_xyz:f'}\n")
    assert_at(err, 3, 29, "nodes[a].fn", "no module named 'no_such_module_xyz'")
    err = load_error(HEAD + "  - {id: a, kind: func, fn: 'wf_helpers:merge_hit'}\n")
    assert_at(err, 3, 29, "nodes[a].fn", "no attribute 'merge_hit'", "did you mean 'merge_hits'")
    err = load_error(HEAD + "  - {id: a, kind: func, fn: 'wf_helpers:NOT_CALLABLE'}\n")
    assert_at(err, 3, 29, "nodes[a].fn", "not a function")
    err = load_error(HEAD + "  - {id: a, kind: tool, tool: 'wf_helpers:not_a_tool'}\n")
    assert_at(err, 3, 31, "nodes[a].tool", "not a Tool", "@tool")
    err = load_error(HEAD + "  - {id: a, kind: func, fn: 'wf_helpers.merge_hits'}\n")
    assert_at(err, 3, 29, "nodes[a].fn", "import path like 'package.module:name'")


def test_unknown_builtin_tool() -> None:
    err = load_error(HEAD + "  - {id: a, kind: llm, prompt: p, tools: [calculater]}\n")
    assert_at(err, 3, 43, "nodes[a].tools[0]")
    try:
        import treadle.tools.builtins  # noqa: F401
    except ImportError:
        assert "not available" in err.problem
    else:
        assert "unknown built-in tool 'calculater'" in err.problem
        assert "did you mean 'calculator'" in err.problem


def test_map_without_node() -> None:
    err = load_error(HEAD + "  - id: m\n    kind: map\n    over: $x\n")
    assert_at(err, 3, 5, "nodes[m].node", "missing")


def test_branch_route_that_is_not_a_list() -> None:
    err = load_error(
        HEAD + "  - id: b\n    kind: branch\n    inputs: {x: $a}\n    routes:\n"
        "      yes: [c]\n      no: c\n"
    )
    assert_at(err, 8, 11, "nodes[b].routes.no", "expected a list", "'c'")


def test_duplicate_mapping_key() -> None:
    err = load_error(HEAD + "  - id: a\n    kind: llm\n    prompt: p\n    prompt: q\n")
    assert_at(err, 6, 5, "nodes[a].prompt", "duplicate key 'prompt'", "line 5")
    err = load_error('{"name": "a",\n "name": "b"}', fmt="json")
    assert_at(err, 2, 2, "name", "duplicate key 'name'")


def test_bad_on_error_value() -> None:
    err = load_error(HEAD + "  - {id: a, kind: llm, prompt: p, on_error: retry}\n")
    assert_at(err, 3, 45, "nodes[a].on_error", "'fail', 'skip', 'fallback' or 'handler'", "'retry'")


def test_subgraph_file_missing() -> None:
    err = load_error(HEAD + "  - {id: s, kind: subgraph, graph: sub/nope.yaml}\n")
    assert_at(err, 3, 36, "nodes[s].graph", "subgraph file not found", "nope.yaml")


def test_subgraph_files_that_include_each_other(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(HEAD + "  - {id: s, kind: subgraph, graph: b.yaml}\n")
    (tmp_path / "b.yaml").write_text(HEAD + "  - {id: t, kind: subgraph, graph: a.yaml}\n")
    with pytest.raises(WorkflowFileError) as info:
        load_workflow(tmp_path / "a.yaml")
    assert_at(info.value, 3, 36, "nodes[t].graph", "a.yaml -> b.yaml -> a.yaml")
    assert info.value.file == str(tmp_path / "b.yaml")


def test_errors_inside_a_subgraph_file_name_that_file(tmp_path: Path) -> None:
    (tmp_path / "main.yaml").write_text(HEAD + "  - {id: s, kind: subgraph, graph: sub.yaml}\n")
    (tmp_path / "sub.yaml").write_text("name: sub\nnodes:\n  - {id: x, kind: llm}\n")
    with pytest.raises(WorkflowFileError) as info:
        load_workflow(tmp_path / "main.yaml")
    assert_at(info.value, 3, 5, "nodes[x].prompt", "missing")
    assert info.value.file == str(tmp_path / "sub.yaml")


def test_type_declaration_problems() -> None:
    err = load_error("name: g\ntypes:\n  A: {b: B}\n  B: {a: A}\n")
    assert_at(err, 3, 3, "types.A", "recursive inline types", "A -> B -> A")
    err = load_error("name: g\ntypes:\n  str: {a: int}\n")
    assert_at(err, 3, 3, "types.str", "built-in type")
    err = load_error("name: g\ninputs:\n  n: {type: int, default: many}\n")
    assert_at(err, 3, 27, "inputs.n.default", "does not fit the type")
    err = load_error("name: g\ntypes:\n  A:\n    n: {type: int, default: x}\n")
    assert_at(err, 4, 29, "types.A.n.default", "does not fit the type")


def test_yaml_features_that_are_refused() -> None:
    err = load_error("name: !custom g\n")
    assert_at(err, 1, 7, "name", "YAML tags are not supported")
    err = load_error(HEAD + "  - {id: a, kind: llm, prompt: p, inputs: {x: !thing {a: 1}}}\n")
    assert_at(err, 3, 47, "nodes[a].inputs.x", "YAML tags are not supported", "!thing")


def test_missing_file_and_non_mapping_node(tmp_path: Path) -> None:
    with pytest.raises(WorkflowFileError) as info:
        load_workflow(tmp_path / "absent.yaml")
    assert_at(info.value, 1, 1, "(document)", "file not found")
    assert_at(load_error(HEAD + "  - just a string\n"), 3, 5, "nodes[0]", "must be a mapping")


def test_map_node_has_no_inputs_of_its_own() -> None:
    err = load_error(
        HEAD + "  - {id: m, kind: map, over: $x, inputs: {a: 1}, node: {kind: llm, prompt: p}}\n"
    )
    assert_at(err, 3, 34, "nodes[m].inputs", "unknown field 'inputs'")


def test_every_node_kind_of_the_spec_can_be_written() -> None:
    assert set(FILE_KINDS) == set(NODE_KINDS)


def test_planner_node() -> None:
    spec = load_workflow_text(
        HEAD + "  - id: p\n    kind: planner\n    prompt: 'Answer {q}'\n"
        "    tools: ['wf_helpers:lookup', 'wf_helpers:search_docs']\n"
        "    max_replans: 1\n    inputs: {q: $input.q}\n",
        base_dir=FILES,
    )
    node = spec.node("p")
    assert isinstance(node, PlannerNode)
    assert [t.name for t in node.tools] == ["lookup", "search_docs"]
    assert (node.max_replans, node.output, node.joiner) == (1, str, None)
    err = load_error(HEAD + "  - {id: p, kind: planner, prompt: x, tools: []}\n")
    assert_at(err, 3, 46, "nodes[p].tools", "must not be empty")


def test_error_is_a_value_error_and_pickles() -> None:
    import pickle

    err = load_error("name: 3\n")
    assert isinstance(err, ValueError)
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) and again.field == "name"


# -- type strings ----------------------------------------------------------------------


class _Local(BaseModel):
    x: int


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("str", str),
        ("list[str]", list[str]),
        ("dict[str, list[int]]", dict[str, list[int]]),
        ("tuple[int, ...]", tuple[int, ...]),
        ("set[bytes]", set[bytes]),
        ("int | None", int | None),
        ("Optional[int]", Optional[int]),  # noqa: UP045 - the typing spelling on purpose
        ("Literal['a', 'b:c', -1]", Literal["a", "b:c", -1]),
        ("Any", Any),
        ("None", None),
        ("Local | None", _Local | None),
        ("pydantic:BaseModel", BaseModel),
        ("list[pydantic:BaseModel]", list[BaseModel]),
    ],
)
def test_parse_type(text: str, expected: Any) -> None:
    assert parse_type(text, local_types={"Local": _Local}) == expected


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("__import__('os')", "is not a type"),
        ("typing.Any", "'typing:Any'"),
        ("list[int, str]", "takes 1"),
        ("Optional", "needs parameters"),
        ("os:path", "not a type"),
        ("list[", "not valid syntax"),
        ("'X'", "only allowed inside Literal"),
    ],
)
def test_parse_type_refuses(text: str, words: str) -> None:
    with pytest.raises(TypeRefError) as info:
        parse_type(text)
    assert words in str(info.value)


def test_local_module_import_does_not_touch_sys_path() -> None:
    before = list(sys.path)
    load_workflow(FILES / "research.yaml")
    assert sys.path == before


# -- JSON Schema -----------------------------------------------------------------------


def test_json_schema_describes_the_format() -> None:
    schema = workflow_json_schema()
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert schema["title"] == "treadle workflow"
    assert schema["required"] == ["name"]
    assert schema["additionalProperties"] is False
    defs = schema["$defs"]
    assert {"LLMNode", "MapNode", "BranchNode", "InnerToolNode", "InputDecl"} <= set(defs)
    assert "prompt" in defs["LLMNode"]["required"] and "id" in defs["LLMNode"]["required"]
    assert "id" not in defs["InnerLLMNode"].get("required", [])
    assert defs["LLMNode"]["properties"]["on_error"]["enum"] == [
        "fail",
        "skip",
        "fallback",
        "handler",
    ]
    json.dumps(schema)  # plain JSON


def test_json_schema_validates_the_sample_files() -> None:
    from ruamel.yaml import YAML

    data = YAML(typ="safe").load((FILES / "research.yaml").read_text())
    data["nodes"][3]["routes"] = {"true": ["execute"], "false": ["repair"]}  # JSON keys
    data["nodes"][3]["default"] = "false"
    json_data = json.loads((FILES / "research.json").read_text())
    bad = {**json_data, "nodes": [{"id": "a", "kind": "llm", "promt": "x"}]}
    try:
        import jsonschema
    except ImportError:  # structural check only: the sample's keys are all declared
        props = workflow_json_schema()["properties"]
        assert set(data) <= set(props) and set(json_data) <= set(props)
        return
    validator = jsonschema.Draft202012Validator(workflow_json_schema())
    for doc in (data, json_data):
        errors = list(validator.iter_errors(doc))
        assert errors == [], errors[0].message if errors else ""
    assert list(validator.iter_errors(bad))


def test_a_workflow_needs_nodes() -> None:
    """14.6: `nodes: []` and a file without `nodes` are refused where they are written."""
    from treadle.graphs.compile import GraphValidationError, compile_graph

    for text, where in (
        ("name: g\nnodes: []\n", "flow.yaml:2:8: "),
        ("name: g\n", "flow.yaml:1:1: "),
    ):
        spec = load_workflow_text(text, filename="flow.yaml", base_dir=FILES)
        with pytest.raises(GraphValidationError) as info:
            compile_graph(spec)
        assert str(info.value.issues[0]) == where + "field 'nodes': a graph needs at least one node"


def test_a_fallback_of_the_wrong_type_is_reported_at_its_line() -> None:
    """14.6: the fallback is checked against the node's output type, with its position."""
    from treadle.graphs.compile import GraphValidationError, compile_graph

    spec = load_workflow_text(
        "name: g\ntypes:\n  Count: {n: int}\nnodes:\n"
        "  - id: a\n    kind: llm\n    prompt: How many?\n    output: Count\n"
        "    on_error: fallback\n    fallback: {n: many}\n",
        filename="flow.yaml",
        base_dir=FILES,
    )
    with pytest.raises(GraphValidationError) as info:
        compile_graph(spec)
    (issue,) = info.value.issues
    assert str(issue).startswith(
        "flow.yaml:10:15: node 'a', field 'fallback': fallback {'n': 'many'} is not a Count"
    )


@pytest.mark.parametrize("depth", [150, 300, 2000])
@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_deep_nesting_is_a_clear_error_not_a_crash(
    depth: int, fmt: Literal["yaml", "json"]
) -> None:
    """14.7: a value nested thousands deep is refused where it passes the limit, whichever
    pass (parser, constructor, validation) would have run out of stack first."""
    value = "[" * depth + "]" * depth
    if fmt == "yaml":
        text = HEAD + "  - {id: a, kind: llm, prompt: hi, inputs: {q: " + value + "}}\n"
    else:
        text = (
            '{"name": "g", "nodes": [{"id": "a", "kind": "llm", "prompt": "hi", "inputs": {"q": '
            + value
            + "}}]}"
        )
    err = load_error(text, fmt=fmt)
    # levels: the document, nodes, the node, inputs: the list opens at level 5
    col = text.index("[" * depth) + 1 + (100 - 4)
    line = 3 if fmt == "yaml" else 1
    assert (err.line, err.col) == (line, col - (len(HEAD) if fmt == "yaml" else 0)), str(err)
    assert "nested more than 100 levels deep" in err.problem


def test_deep_block_nesting_is_a_clear_error() -> None:
    """14.7: the same for nesting by indentation."""
    lines = [f"{'  ' * i}k{i}:" for i in range(120)]
    text = "name: g\nnodes: []\ntypes:\n  T:\n" + "\n".join("    " + ln for ln in lines) + " 1\n"
    err = load_error(text)
    assert "nested more than 100 levels deep" in err.problem
    assert err.line == 5 + 98, str(err)  # k0 is on line 5; level 101 holds k98


@pytest.mark.parametrize(
    ("text", "line", "col", "words"),
    [
        # the string opened on line 5 runs to the end of the file
        (
            HEAD + '  - id: a\n    kind: llm\n    prompt: "hello\n    inputs: {}\n'
            "  - id: b\n    kind: llm\n    prompt: hi\n",
            5,
            13,
            ("quoted string is never closed (the file ends at 10:1)",),
        ),
        # the flow mapping opened on line 3 is not closed before line 4
        (
            HEAD + "  - {id: a, kind: llm, prompt: hi\n  - id: b\n    kind: llm\n",
            3,
            5,
            ("'{' is not closed", "expected ',' or '}', but got ':' at 4:7"),
        ),
        (
            "name: g\nnodes: [\n  {id: a, kind: llm, prompt: hi}\n",
            2,
            8,
            ("'[' is not closed", "at 4:1"),
        ),
    ],
)
def test_unclosed_strings_and_brackets_point_where_they_start(
    text: str, line: int, col: int, words: tuple[str, ...]
) -> None:
    """14.8: not where the parser gave up, lines later."""
    assert_at(load_error(text), line, col, "(document)", *words)


def test_bytes_that_are_not_utf8_are_reported_at_their_line(tmp_path: Path) -> None:
    """14.8: the line, column and byte offset of the first bad byte, not 1:1."""
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"name: g\ndescription: caf\xe9 au lait\nnodes: []\n")
    with pytest.raises(WorkflowFileError) as info:
        load_workflow(path)
    assert_at(info.value, 2, 17, "(document)", "not UTF-8 text", "byte 0xe9 at offset 24")
