"""Model entries (`models:`) are checked before a run exists, and a run that still cannot
build its backend is recorded as failed, never left `running` (14.6)."""

from __future__ import annotations

import textwrap

import pytest

from treadle import GraphValidationError, Runtime
from treadle.graphs.compile import compile_graph
from treadle.graphs.files.loader import load_workflow_text
from treadle.runtime.core.store import RunRecord
from treadle.runtime.execution.runtime import InvalidModel
from treadle.runtime.stores.memory import MemoryStore

pytestmark = pytest.mark.anyio


def workflow(models: str) -> str:
    return (
        "name: m\nmodels:\n"
        + textwrap.indent(textwrap.dedent(models), "  ")
        + "nodes:\n  - {id: a, kind: llm, prompt: hi}\n"
    )


def test_bad_entries_are_validation_errors_at_their_line() -> None:
    spec = load_workflow_text(
        workflow(
            """\
            default:
              backend: openai_compat
              base_url: "localhost:8000"
              model: m
            pooled:
              backend: pool
              replicas: ["http://a:8000/v1"]
            """
        ),
        filename="flow.yaml",
    )
    compile_graph(spec)  # the graphs layer alone knows no backend
    with pytest.raises(GraphValidationError) as info:
        Runtime().compile(spec)
    found = [str(i) for i in info.value.issues]
    assert found == [
        "flow.yaml:5:15: field 'models.default.base_url': must start with http:// or "
        "https:// (got 'localhost:8000')",
        "flow.yaml:9:15: field 'models.pooled.replicas': replica 0 is 'http://a:8000/v1': "
        "each replica is a model entry of its own, e.g. {backend: openai_compat, "
        "base_url: ..., model: ...}",
    ]


def test_a_runtime_refuses_a_bad_entry_at_once() -> None:
    with pytest.raises(InvalidModel, match="model 'x': invalid 'openai_compat' model entry"):
        Runtime(models={"x": {"backend": "openai_compat", "base_url": "h:1", "model": "m"}})


async def test_a_backend_that_cannot_be_built_leaves_no_running_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TREADLE_SURELY_UNSET", raising=False)
    spec = load_workflow_text(
        workflow(
            """\
            default:
              backend: openai_compat
              base_url: "http://localhost:9/v1"
              model: m
              api_key_env: TREADLE_SURELY_UNSET
            """
        )
    )
    store = MemoryStore()
    runtime = Runtime(store=store)
    with pytest.raises(InvalidModel, match="TREADLE_SURELY_UNSET is not set"):
        await runtime.run(spec)
    assert await store.list_runs() == []  # refused before the run existed
    # a run whose record exists already (a daemon's API made it) is recorded as failed
    await store.create_run(RunRecord(run_id="r1", graph="m", status="running"))
    with pytest.raises(InvalidModel):
        async with runtime.open_run(runtime.compile(spec), await store.get_run("r1"), resume=False):
            pass
    record = await store.get_run("r1")
    assert record is not None and record.status == "failed"
    assert "TREADLE_SURELY_UNSET is not set" in (record.error or "")
