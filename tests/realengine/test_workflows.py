"""The examples' workflows, and a streaming planner, on a real `llama-server` through the
`openai_compat` backend with the `llamacpp` dialect.

The tiny model is random: its JSON parses because the server constrains it to the node's
schema (`response_format: json_schema`), and its plan parses because the test constrains
the planner's calls with a grammar. What is checked is the path: real HTTP, real
tokenisation and chat template, the server's grammar engine, treadle's parsing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from treadle.backends.base import LLMRequest, LLMResponse
from treadle.backends.openai_compat.llamacpp import LlamaCppBackend
from treadle.cli.programs import load_program
from treadle.graphs.files.loader import load_workflow_text
from treadle.runtime.core.events import LLMCallFinished
from treadle.runtime.execution.runtime import Runtime
from treadle.runtime.nodes.planner.prompts import parse_joiner
from treadle.testing.llamacpp import MODEL_ALIAS, LlamaServer

pytestmark = pytest.mark.anyio

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("example", ["research", "doc_digest"])
async def test_an_example_workflow_runs_on_llama_cpp(
    llama_server: LlamaServer, example: str
) -> None:
    """The workflow file's own model is replaced by a `models:` entry, as a user would
    point it at their server: the factory builds the slot-placing backend."""
    config = {
        "backend": "openai_compat",
        "base_url": llama_server.url + "/v1",
        "model": MODEL_ALIAS,
        "dialect": "llamacpp",
        "retries": 0,
    }
    runtime = Runtime(models={"default": config})
    result = await runtime.run(load_program(str(EXAMPLES / f"{example}.yaml")))
    assert result.status == "succeeded"
    calls = [e for e in result.events if isinstance(e, LLMCallFinished)]
    assert calls and all(e.prompt_tokens > 0 and e.error is None for e in calls)


PLANNER = """
name: plan_sum
inputs:
  question: {type: str, default: "What is 2 + 3?"}
nodes:
  - id: solve
    kind: planner
    prompt: "{question}"
    tools: [calculator]
    output: int
    max_replans: 0
    inputs: {question: $input.question}
outputs:
  answer: $solve
"""

#: the plan, then endless text: the server would write until max_tokens unless told to stop
PLAN_GRAMMAR = (
    'root ::= "Thought: add them.\\n1. calculator(\\"2 + 3\\")\\n2. join()\\n" tail\n'
    "tail ::= [a-z ]*\n"
)
JOIN_GRAMMAR = 'root ::= "Thought: the sum is known.\\nAction: Finish(5)"\n'
PLAN_MAX_TOKENS = 6000


class GrammarPlanner(LlamaCppBackend):
    """The test's stand-in for a model that knows the planner's format: a grammar per call,
    told apart by the request ids the planner gives its plan and joiner calls."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.streamed_plans = 0

    @staticmethod
    def _grammar(request: LLMRequest) -> dict[str, Any]:
        if ":plan" in (request.hints.request_id or ""):
            return {"grammar": PLAN_GRAMMAR, "ignore_eos": True, "max_tokens": PLAN_MAX_TOKENS}
        return {"grammar": JOIN_GRAMMAR}

    async def stream(self, request: LLMRequest, **kw: Any):  # type: ignore[override]
        body = self._grammar(request)
        self.streamed_plans += "ignore_eos" in body
        async for chunk in super().stream(request, extra_body=body):
            yield chunk

    async def generate(self, request: LLMRequest, **kw: Any) -> LLMResponse:
        return await super().generate(request, extra_body=self._grammar(request))


async def test_planner_streams_its_plan_and_stops_the_server_at_join(
    llama_server: LlamaServer,
) -> None:
    backend = GrammarPlanner(llama_server.url, MODEL_ALIAS, retries=0)
    async with backend:
        runtime = Runtime(models={"default": backend}, stream_tokens=True)
        result = await runtime.run(load_workflow_text(PLANNER, filename="plan_sum.yaml"))
        assert result.status == "succeeded"
        assert result.output.answer == 5  # type: ignore[union-attr]
        assert backend.streamed_plans == 1
        # the planner stopped reading at join(): the server stopped generating, long before
        # the plan call's max_tokens, and no slot is left busy
        async with httpx.AsyncClient() as client:
            for _ in range(200):
                states = (await client.get(llama_server.url + "/slots")).json()
                if not any(s["is_processing"] for s in states):
                    break
                await anyio.sleep(0.05)
            metrics = (await client.get(llama_server.url + "/metrics")).text
        assert not any(s["is_processing"] for s in states)
        predicted = _counter(metrics, "llamacpp:tokens_predicted_total")
        assert predicted < PLAN_MAX_TOKENS / 2
        assert backend.table is not None and not any(s.busy for s in backend.table.slots)


def _counter(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in the metrics: {text[:500]}")


def test_the_joiner_grammar_is_the_planners_format() -> None:
    """Guard for the test above: the canned joiner answer is one the planner accepts."""
    text = json.loads(JOIN_GRAMMAR.split("::= ", 1)[1].strip())
    decision = parse_joiner(text)
    assert (decision.action, decision.text) == ("finish", "5")
