"""The import allow-list and the other limits on a tenant's workflow definition (no Redis:
`WorkflowRegistry.prepare` checks and compiles without storing)."""

from __future__ import annotations

import sys
from typing import Any, cast

import pytest

from treadle.runtime.daemon.definitions import DefinitionError
from treadle.runtime.daemon.import_allowlist import ImportAllowList
from treadle.runtime.daemon.keys import DaemonKeys
from treadle.runtime.daemon.registry import WorkflowRegistry


def prepare(text: str, allow: tuple[str, ...] = (), fmt: str = "yaml") -> Any:
    registry = WorkflowRegistry(cast(Any, None), DaemonKeys(), ImportAllowList(allow))
    return registry.prepare(text, cast(Any, fmt), "flow.yaml")


def refused(text: str, allow: tuple[str, ...] = (), fmt: str = "yaml") -> str:
    with pytest.raises(DefinitionError) as info:
        prepare(text, allow, fmt)
    return str(info.value)


FUNC = "name: x\nnodes:\n  - {{id: a, kind: func, fn: '{}', inputs: {{batches: []}}}}\n"


def test_allowed_prefixes_and_builtin_tools() -> None:
    research = "treadle.examples.research"
    cg = prepare(FUNC.format(f"{research}:merge_hits"), allow=("treadle.examples",))
    assert cg.name == "x"
    # a prefix is a whole module path, not a string prefix
    message = refused(FUNC.format(f"{research}:merge_hits"), allow=("treadle.example",))
    assert message.startswith("flow.yaml:3:") and "not allowed here" in message
    builtin = (
        "name: x\nnodes:\n  - {id: a, kind: tool, tool: calculator, inputs: {expression: '1+1'}}\n"
    )
    assert prepare(builtin).name == "x"


def test_a_refused_module_is_never_imported() -> None:
    assert "this" not in sys.modules  # importing `this` prints the Zen of Python
    message = refused(FUNC.format("this:s"))
    assert "module 'this' is not allowed" in message
    assert "this" not in sys.modules


@pytest.mark.parametrize(
    "text",
    [
        # private attributes and re-exports of other modules through an allowed one
        FUNC.format("treadle.examples.research:__builtins__"),
        FUNC.format("treadle.examples.research:re.compile"),
        FUNC.format("treadle.examples.text_to_sql:sqlite3.connect"),
        "name: x\ninputs:\n  p: 'treadle.examples.research:Path'\nnodes: []\n",
    ],
)
def test_allowed_modules_cannot_reach_beyond_themselves(text: str) -> None:
    message = refused(text, allow=("treadle.examples",))
    assert "not allowed" in message


@pytest.mark.parametrize(
    "text",
    [
        # every place a name can be resolved from
        "name: x\nnodes:\n  - {id: a, kind: tool, tool: 'os:system'}\n",
        "name: x\nnodes:\n  - {id: a, kind: llm, prompt: hi, tools: [calculator, 'os:x']}\n",
        "name: x\nnodes:\n  - {id: a, kind: llm, prompt: hi, output: 'list[os:PathLike]'}\n",
        "name: x\ninputs:\n  q: {type: 'os:PathLike'}\nnodes: []\n",
        "name: x\ntypes:\n  T: {f: 'os:PathLike'}\nnodes: []\n",
        "name: x\nnodes:\n  - {id: m, kind: map, over: [1], node: {kind: func, fn: 'os:getcwd'}}\n",
        "name: x\nnodes:\n  - {id: m, kind: map, over: [1], reduce: 'os:getcwd',"
        " node: {kind: llm, prompt: hi}}\n",
        "name: x\nnodes:\n  - {id: b, kind: branch, route: 'os:getcwd', routes: {a: []}}\n",
        "name: x\nnodes:\n  - id: s\n    kind: subgraph\n    graph:\n      nodes:\n"
        "        - {id: a, kind: func, fn: 'os:getcwd'}\n",
        # a !!str tag is still a string to the loader
        "name: x\nnodes:\n  - {id: a, kind: func, fn: !!str 'os:getcwd'}\n",
        "name: x\nnodes:\n  - {id: a, kind: func, !!str fn: 'os:getcwd'}\n",
        # the same in JSON
    ],
)
def test_every_import_site_is_checked(text: str) -> None:
    assert "not allowed" in refused(text)


def test_json_definitions_are_checked_too() -> None:
    text = '{"name": "x", "nodes": [{"id": "a", "kind": "func", "fn": "os:getcwd"}]}'
    message = refused(text, fmt="json")
    assert message.startswith("flow.yaml:1:") and "not allowed" in message


def test_free_text_may_contain_colons() -> None:
    text = (
        "name: x\ninputs:\n  q: {type: str, default: 'a:b'}\nnodes:\n"
        "  - {id: a, kind: llm, prompt: 'Answer as key:value {q}', system: 'os:system',"
        " inputs: {q: $input.q}}\n"
    )
    assert prepare(text).name == "x"


def test_subgraph_files_models_and_environment() -> None:
    sub = "name: x\nnodes:\n  - {id: s, kind: subgraph, graph: other.yaml}\n"
    assert "subgraph files are not available" in refused(sub)
    remote = "name: x\nmodels:\n  m: {backend: litellm, model: gpt}\nnodes: []\n"
    assert "backend 'litellm' is not allowed" in refused(remote)
    env = "name: x\nmodels:\n  m: {backend: scripted, api_key_env: HOME}\nnodes: []\n"
    assert "environment" in refused(env)
    sim_file = "name: x\nmodels:\n  m: {backend: sim, profile: /etc/passwd}\nnodes: []\n"
    assert "bundled profiles" in refused(sim_file)
    sim_script = "name: x\nmodels:\n  m: {backend: sim, script: rules.yaml}\nnodes: []\n"
    assert "script files" in refused(sim_script)
    nested = (
        "name: x\nmodels:\n  m: {backend: pool, replicas: [{backend: litellm, model: g}]}\n"
        "nodes: []\n"
    )
    assert "backend 'pool' is not allowed" in refused(nested)
    typo = "name: x\nmodels:\n  m: {backend: scripted, latency: 1}\nnodes: []\n"
    assert "invalid 'scripted' model entry" in refused(typo)


def bomb(levels: int) -> str:
    """A million-value YAML alias bomb (10**levels) hidden in a node's literal inputs."""
    lines = ["name: x", "x_defs:", "  - &l0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        lines.append(f"  - &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]")
    lines += ["nodes:", f"  - {{id: a, kind: llm, prompt: hi, inputs: {{q: *l{levels - 1}}}}}"]
    return "\n".join(lines) + "\n"


def test_yaml_alias_bombs_are_refused_before_they_expand() -> None:
    message = refused(bomb(6))
    assert "expands to more than" in message
    # a few aliases are fine (the loader then reports the unknown key)
    assert "expands" not in refused(bomb(2))
