"""The node kinds are defined once: every kind has its file model, its SDK method and its
executor; a kind that misses a decision is refused at once; node options are validated
with messages that list the valid ones."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from treadle import Graph, NodeOptions, step
from treadle.graphs.compiled import CompiledNode
from treadle.graphs.files.schema import INNER_NODE_MODELS, NODE_MODELS
from treadle.graphs.kinds import KINDS, NODE_KINDS, FuncNode, KindMethods, kind_of
from treadle.graphs.kinds.base import Checks, DocPath, FileResolver, Imported, NodeKind
from treadle.runtime.nodes import registry


def test_every_kind_has_file_models_an_sdk_method_and_an_executor() -> None:
    for kind in KINDS:
        assert NODE_KINDS[kind.name] is kind.spec
        assert NODE_MODELS[kind.name].__name__ == kind.spec.__name__
        assert INNER_NODE_MODELS[kind.name].__name__ == "Inner" + kind.spec.__name__
        assert callable(getattr(KindMethods, kind.name))
        assert registry.executor_for(kind.spec.__new__(kind.spec)).spec is kind.spec


def test_a_kind_that_misses_a_decision_cannot_exist() -> None:
    class Half(NodeKind[FuncNode]):  # no `imported`, `cost_s`, `llm_steps`
        spec = FuncNode

        def from_file(
            self, m: Any, common: dict[str, Any], r: FileResolver, path: DocPath
        ) -> FuncNode:
            raise NotImplementedError

        def describe(self, node: FuncNode, c: Checks, item_type: Any) -> CompiledNode:
            raise NotImplementedError

    with pytest.raises(TypeError, match="abstract"):
        Half()  # type: ignore[abstract]


def test_a_kind_without_an_executor_is_refused_with_what_to_write(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Echo(NodeKind[FuncNode]):
        spec = FuncNode

        @property
        def name(self) -> str:
            return "echo_without_executor"

        def from_file(
            self, m: Any, common: dict[str, Any], r: FileResolver, path: DocPath
        ) -> FuncNode:
            raise NotImplementedError

        def describe(self, node: FuncNode, c: Checks, item_type: Any) -> CompiledNode:
            raise NotImplementedError

        def cost_s(self, node: FuncNode) -> float:
            return 0.0

        def llm_steps(self, node: FuncNode) -> int:
            return 0

        def imported(self, node: FuncNode) -> Iterator[Imported]:
            return iter(())

    monkeypatch.setattr(registry, "KINDS", (*KINDS, Echo()))
    with pytest.raises(ImportError, match=r"treadle\.runtime\.nodes\.echo_without_executor"):
        registry._load()


def test_kind_of_refuses_a_spec_no_kind_defines() -> None:
    class Stray(FuncNode):
        pass

    with pytest.raises(TypeError, match="Stray is not a node kind"):
        kind_of(Stray(id="s"))


def test_an_unknown_node_option_is_a_type_error_that_lists_the_valid_ones() -> None:
    g = Graph("opts", inputs={"x": int})
    with pytest.raises(TypeError) as info:
        g.func("a", lambda x: x, inputs={"x": g.input.x}, retires=2)
    message = str(info.value)
    assert "unknown node option 'retires'" in message and "did you mean 'retries'" in message
    assert "valid options: retries, backoff_s, backoff_max_s, jitter, timeout_s" in message
    with pytest.raises(TypeError, match="unknown node option 'tiemout_s'"):
        step.llm("p", tiemout_s=3)


def test_option_values_are_checked_by_pydantic_with_the_others() -> None:
    options = NodeOptions.of({"retries": -1, "jitter": 2, "on_error": "explode"})
    assert dict(options.problems()) == {
        "retries": "retries must be >= 0",
        "jitter": "jitter must be <= 1",
        "on_error": "on_error must be one of 'fail', 'skip', 'fallback' or 'handler'",
    }
    assert NodeOptions(retries=2).problems() == []
    assert NodeOptions.of({"retries": 2}) == NodeOptions(retries=2)
