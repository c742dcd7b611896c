"""The `llm` node's executor: a chat call, or a tool-calling conversation (the tools a
turn asks for run at once) until the model answers without calling a tool, and the answer
parsed into the node's output type."""

from __future__ import annotations

import functools
import json
import re
from typing import Any

from pydantic import BaseModel, ValidationError

from treadle.backends.base import LLMRequest, Message, SchedulingHints
from treadle.graphs.compiled import LLMFacts
from treadle.graphs.kinds import LLMNode
from treadle.runtime.core.context import RunContext
from treadle.runtime.core.errors import NodeError, OutputError
from treadle.runtime.core.gateway import call_llm
from treadle.runtime.core.values import as_text
from treadle.runtime.nodes.base import NodeCall, NodeExecutor
from treadle.runtime.nodes.tool import run_tool_calls
from treadle.tools.base import Tool


class LLMExecutor(NodeExecutor[LLMNode]):
    spec = LLMNode

    async def run(self, call: NodeCall[LLMNode]) -> Any:
        return await run_llm_node(call.ctx, call.spec, call.llm_facts, call.instance, call.inputs)


EXECUTOR = LLMExecutor()


async def run_llm_node(
    ctx: RunContext, spec: LLMNode, facts: LLMFacts | None, node: str, inputs: dict[str, Any]
) -> Any:
    """Run an `llm` node's conversation to its final, parsed answer."""
    text = {k: as_text(v) for k, v in inputs.items()}
    messages: list[Message] = []
    if spec.system:
        messages.append(Message(role="system", content=spec.system.format(**text)))
    messages.append(Message(role="user", content=spec.prompt.format(**text)))
    schema = output_schema(spec.output)
    tools = {t.name: t for t in spec.tools}
    tool_specs = [t.openai_schema() for t in spec.tools]
    # with tools, any turn may call one, so only a tool-less last node is a last step
    last_step = facts is not None and facts.is_last_llm_step and not tools
    next_tool = next(iter(tools), None) or (
        facts.next_tools[0] if facts and facts.next_tools else None
    )
    steps = facts.steps_to_execution if facts is not None else None
    repaired = False
    for turn in range(1, spec.max_turns + 1):
        request = LLMRequest(
            model=spec.model,
            messages=list(messages),
            tools=tool_specs,
            response_schema=schema,
            temperature=spec.temperature,
            max_tokens=spec.max_tokens,
            hints=SchedulingHints(
                program_id=ctx.run_id,
                request_id=f"{ctx.run_id}:{node}:{turn}",
                tenant=ctx.options.tenant,
                next_tool=next_tool,
                is_last_step=last_step,
                steps_to_execution=steps,
                tool_duration_s=tool_duration(tools.get(next_tool or "")),
                # with tools, a turn may call one instead of ending the node
                human_wait=facts is not None and facts.human_wait_next and not tools,
            ),
        )
        response = await call_llm(ctx, node, spec.model, request)
        if response.tool_calls and tools and turn < spec.max_turns:
            messages.append(
                Message(role="assistant", content=response.content, tool_calls=response.tool_calls)
            )
            results = await run_tool_calls(ctx, node, response.tool_calls, tools)
            messages.extend(
                Message(role="tool", tool_call_id=call.id, name=call.name, content=result)
                for call, result in zip(response.tool_calls, results, strict=True)
            )
            continue
        if response.tool_calls and not response.content:
            raise NodeError(
                node,
                f"model still asked for tools after {spec.max_turns} turns (max_turns)",
            )
        try:
            return parse_output(spec.output, response.content, node)
        except OutputError as exc:
            if repaired or turn >= spec.max_turns:
                raise
            repaired = True
            messages.append(Message(role="assistant", content=response.content))
            messages.append(
                Message(
                    role="user",
                    content=f"That answer was invalid ({exc.reason}). Answer again with "
                    "only a JSON object that matches the schema.",
                )
            )
    raise NodeError(node, "no answer within max_turns")


def tool_duration(tool: Tool | None) -> float | None:
    """How long `tool` is expected to take: its measured mean, else its declared
    `expected_duration_s` (a hint a remote scheduler gets with the call before it)."""
    if tool is None:
        return None
    return tool.stats.mean_s or tool.expected_duration_s


_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.S)


def parse_output(output: Any, content: str | None, node: str) -> Any:
    """The model's answer as the node's declared output type."""
    if output is str or output is Any:
        return content or ""
    text = content or ""
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1)
    try:
        if isinstance(output, type) and issubclass(output, BaseModel):
            return output.model_validate_json(text)
        return json.loads(text)
    except (ValidationError, ValueError) as exc:
        detail = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
        raise OutputError(
            node, f"answer does not match {getattr(output, '__name__', output)}: {detail}"
        ) from None


def output_schema(output: Any) -> dict[str, Any] | None:
    """The JSON Schema of a pydantic output type (None for other types), built once per
    model: pydantic builds it anew on every call, and every LLM call of a node sends it."""
    if isinstance(output, type) and issubclass(output, BaseModel):
        return _model_schema(output)
    return None


@functools.lru_cache(maxsize=256)
def _model_schema(model: type[BaseModel]) -> dict[str, Any]:
    return model.model_json_schema()
