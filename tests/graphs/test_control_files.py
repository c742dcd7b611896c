"""The control-flow kinds and options in workflow files: `ask`, `loop`, `race`, `$index`,
`max_failures`, `on_error: handler` with `$error`, `cache` — loaded to the same specs the
SDK builds, described by the JSON Schema, checked by the daemon's import allow-list, and
drawn."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any, cast

import pytest

from treadle import ERROR, INDEX, ITEM, Graph, Runtime, step
from treadle.graphs.files.loader import WorkflowFileError, load_workflow_text
from treadle.graphs.files.schema import workflow_json_schema
from treadle.graphs.render import to_mermaid
from treadle.runtime.daemon.import_allowlist import ImportAllowList
from treadle.runtime.daemon.keys import DaemonKeys
from treadle.runtime.daemon.registry import DefinitionError, WorkflowRegistry

FILES = Path(__file__).parent / "files"

FLOW = """\
name: control
inputs:
  code: str
  names: list[str]
nodes:
  - id: approve
    kind: ask
    prompt: "Ship {code}?"
    output: control_helpers:Approval
    deadline_s: 3600
    default: {approved: false}
    inputs: {code: $input.code}
  - id: fix
    kind: loop
    body:
      name: attempt
      inputs: {code: str, tries: int}
      nodes:
        - {id: try, kind: func, fn: "control_helpers:attempt",
           inputs: {code: $input.code, tries: $input.tries}}
      outputs: {code: $try.code, passed: $try.passed, tries: $try.tries}
    max_iterations: 4
    while: "control_helpers:still_failing"
    carry: {code: code, tries: tries}
    expected_iterations: 2
    inputs: {code: $input.code, tries: 0}
  - id: pick
    kind: race
    branches:
      - {id: safe, kind: func, fn: "control_helpers:boom", inputs: {x: $input.code},
         on_error: handler,
         handler: {kind: func, fn: "control_helpers:recover", inputs: {error: $error}}}
      - {id: risky, kind: func, fn: "control_helpers:boom", inputs: {x: $input.code}}
  - id: labels
    kind: map
    over: $input.names
    max_failures: 1
    node: {kind: func, fn: "control_helpers:label", inputs: {name: $item, i: $index}}
  - id: cached
    kind: func
    fn: "control_helpers:label"
    cache: {ttl_s: 60, key: [name]}
    inputs: {name: $input.code, i: 1}
outputs:
  approval: $approve
  fixed: $fix
  winner: $pick
  labels: $labels
  cached: $cached
"""


@pytest.fixture
def helpers(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(FILES))
    return importlib.import_module("control_helpers")


def sdk_graph(h: Any) -> Graph:
    body = Graph("attempt", inputs={"code": str, "tries": int})
    tried = body.func("try", h.attempt, inputs={"code": body.input.code, "tries": body.input.tries})
    body.output(code=tried.out.code, passed=tried.out.passed, tries=tried.out.tries)
    g = Graph("control", inputs={"code": str, "names": list[str]})
    approve = g.ask("approve", "Ship {code}?", output=h.Approval, deadline_s=3600,
                    default={"approved": False}, inputs={"code": g.input.code})  # fmt: skip
    fix = g.loop("fix", body, inputs={"code": g.input.code, "tries": 0}, max_iterations=4,
                 while_=h.still_failing, carry={"code": "code", "tries": "tries"},
                 expected_iterations=2)  # fmt: skip
    handler = step.func(h.recover, inputs={"error": ERROR})
    pick = g.race("pick", [
        step.func(h.boom, inputs={"x": g.input.code}, id="safe", on_error="handler",
                  handler=handler),
        step.func(h.boom, inputs={"x": g.input.code}, id="risky"),
    ])  # fmt: skip
    labels = g.map(
        "labels",
        g.input.names,
        step.func(h.label, inputs={"name": ITEM, "i": INDEX}),
        max_failures=1,
    )
    cached = g.func("cached", h.label, inputs={"name": g.input.code, "i": 1},
                    cache={"ttl_s": 60, "key": ["name"]})  # fmt: skip
    g.output(approval=approve, fixed=fix, winner=pick, labels=labels, cached=cached)
    return g


def test_the_file_is_the_same_program_as_the_sdk_and_runs(helpers: ModuleType) -> None:
    spec = load_workflow_text(FLOW, filename="control.yaml", base_dir=FILES)
    sdk = sdk_graph(helpers).spec
    assert spec == sdk
    import anyio

    async def main() -> Any:
        runtime = Runtime()
        waiting = await runtime.run(spec, {"code": "v1", "names": ["a", "b"]})
        assert waiting.status == "waiting"
        return await runtime.resume(waiting.run_id, spec, {"approved": True})

    result = anyio.run(main)
    out = result.output
    assert out.approval.approved and out.fixed.tries == 2
    assert out.winner.winner == "safe" and out.winner.output == "recovered from RuntimeError"
    assert [e.value for e in out.labels] == ["0:a", "1:b"] and out.cached == "1:v1"


def test_the_json_schema_describes_the_new_kinds_and_options() -> None:
    schema = workflow_json_schema()
    defs = schema["$defs"]
    assert {"AskNode", "LoopNode", "RaceNode", "InnerAskNode", "InnerLoopNode"} <= set(defs)
    assert defs["LoopNode"]["required"] == ["id", "kind", "body", "max_iterations"]
    assert "while" in defs["LoopNode"]["properties"] and "until" in defs["LoopNode"]["properties"]
    assert defs["RaceNode"]["properties"]["branches"]["minItems"] == 2
    assert {"prompt", "output", "deadline_s", "default"} <= set(defs["AskNode"]["properties"])
    assert "max_failures" in defs["MapNode"]["properties"]
    llm = defs["LLMNode"]["properties"]
    assert {"handler", "catch", "cache"} <= set(llm)
    assert defs["CacheOptions"]["properties"].keys() == {"ttl_s", "key"}
    kinds = [
        one["$ref"].rsplit("/", 1)[1] for one in schema["properties"]["nodes"]["items"]["oneOf"]
    ]
    assert {"AskNode", "LoopNode", "RaceNode"} <= set(kinds)


def load_error(text: str) -> WorkflowFileError:
    with pytest.raises(WorkflowFileError) as info:
        load_workflow_text(text, filename="flow.yaml", base_dir=FILES)
    return info.value


def test_mistakes_in_the_new_kinds_name_file_line_and_field(helpers: ModuleType) -> None:
    missing = load_error(
        "name: x\nnodes:\n  - id: l\n    kind: loop\n    body: {nodes: []}\n    until: ok\n"
    )
    assert (missing.line, missing.field) == (3, "nodes[l].max_iterations")
    typo = load_error("name: x\nnodes:\n  - {id: a, kind: ask, prompt: hi, deadline: 5}\n")
    assert typo.field == "nodes[a].deadline" and "deadline_s" in str(typo)
    one = load_error(
        "name: x\nnodes:\n  - id: r\n    kind: race\n    branches:\n"
        "      - {kind: func, fn: 'control_helpers:boom', inputs: {x: a}}\n"
    )
    assert one.field == "nodes[r].branches" and "must have at least 2 entries" in str(one)


def prepare(text: str, allow: tuple[str, ...]) -> Any:
    registry = WorkflowRegistry(cast(Any, None), DaemonKeys(), ImportAllowList(allow))
    return registry.prepare(text, "yaml", "flow.yaml")


def test_the_import_allow_list_sees_into_branches_handlers_and_loop_conditions() -> None:
    race = (
        "name: x\nnodes:\n  - id: r\n    kind: race\n    branches:\n"
        "      - {id: a, kind: tool, tool: calculator, inputs: {expression: '1'}}\n"
        "      - {id: b, kind: func, fn: 'this:s', inputs: {}}\n"
    )
    with pytest.raises(DefinitionError, match=r"flow.yaml:7:.*module 'this' is not allowed"):
        prepare(race, ())
    handler = (
        "name: x\nnodes:\n  - {id: a, kind: tool, tool: calculator, inputs: {expression: '1'},\n"
        "     on_error: handler, handler: {kind: func, fn: 'this:s', inputs: {}}}\n"
    )
    with pytest.raises(DefinitionError, match="module 'this' is not allowed"):
        prepare(handler, ())
    loop = (
        "name: x\nnodes:\n  - id: l\n    kind: loop\n    max_iterations: 2\n"
        "    until: 'this:s'\n    body: {nodes: []}\n"
    )
    with pytest.raises(DefinitionError, match="module 'this' is not allowed"):
        prepare(loop, ())


def test_the_new_kinds_are_drawn(helpers: ModuleType) -> None:
    text = to_mermaid(sdk_graph(helpers).spec)
    assert 'approve[/"approve<br/>ask"\\]' in text
    assert 'pick{{"pick<br/>race: safe | risky"}}' in text
    assert 'fix[["fix<br/>loop ≤ 4"]]' in text
    assert "_index" not in text
