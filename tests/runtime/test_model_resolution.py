"""Each run resolves its models from its own workflow and the runtime's (operator's)
configuration only: no run's resolution changes another's, in one `Runtime` (as a worker
runs every tenant's runs) or across tenants."""

from __future__ import annotations

import pytest

from treadle.graphs.files.loader import load_workflow_text
from treadle.graphs.spec import GraphSpec
from treadle.runtime.execution.runtime import Runtime

pytestmark = pytest.mark.anyio

WITHOUT_MODELS = """\
name: plain
nodes:
  - {id: a, kind: llm, prompt: "Say hello"}
outputs: {a: $a}
"""

WITH_DEFAULT = """\
name: own
models:
  default:
    backend: scripted
    rules: [{match: "hello", content: "ANSWER"}]
nodes:
  - {id: a, kind: llm, prompt: "Say hello"}
outputs: {a: $a}
"""


async def test_a_run_without_a_default_model_does_not_replace_later_runs_models() -> None:
    runtime = Runtime()
    first = await runtime.run(load_workflow_text(WITHOUT_MODELS), {})
    assert str(first.output.a).startswith("Answer (")  # the fallback scripted backend
    for answer in ("mine", "theirs"):
        own = await runtime.run(load_workflow_text(WITH_DEFAULT.replace("ANSWER", answer)), {})
        assert own.output.a == answer


async def test_runs_of_tenants_resolve_their_own_declared_models() -> None:
    runtime = Runtime()

    def own(answer: str) -> GraphSpec:
        return load_workflow_text(WITH_DEFAULT.replace("ANSWER", answer))

    a = await runtime.run(own("A"), {}, tenant="a")
    b = await runtime.run(own("B"), {}, tenant="b")
    plain = await runtime.run(load_workflow_text(WITHOUT_MODELS), {}, tenant="c")
    again = await runtime.run(own("A"), {}, tenant="a")
    assert (a.output.a, b.output.a, again.output.a) == ("A", "B", "A")
    assert str(plain.output.a).startswith("Answer (")


async def test_tenants_declaring_the_same_model_get_backends_of_their_own() -> None:
    runtime = Runtime()
    spec = load_workflow_text(WITH_DEFAULT.replace("ANSWER", "x"))
    cg = runtime.compile(spec)
    mine = runtime._backends(cg, tenant="a")["default"]
    assert runtime._backends(cg, tenant="a")["default"] is mine  # reused within a tenant
    assert runtime._backends(cg, tenant="b")["default"] is not mine
