"""The `scripted` backend: deterministic answers, so every workflow runs offline.

Rules (`ScriptRule`) match a regular expression against the latest user message and answer
with fixed content or tool calls. Patterns are RE2's (google-re2): matching takes time
linear in the text, whatever the pattern, so a rule written by one tenant of a daemon cannot
stall the process that runs it (Python's backtracking `re` takes exponential time on
`(a+)+$`). RE2 has no backreferences or lookarounds; a pattern using them is refused where
it is written. Without a matching rule, the answer is generated from the
request's response schema: a value that validates against it, derived from a hash of the
prompt, so equal prompts give equal answers.

Tool calls follow the request's `tool_choice` as an engine with constrained decoding does
(vLLM): none without tools or with "none" (a tool-call rule is passed over), a call forced
with "required" (the rule's, or one to the first tool) or a named function (to that one),
arguments generated from the function's parameter schema when no rule gives them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import anyio
import re2
from pydantic import BaseModel, Field, field_validator

from treadle.backends.base import (
    BackendTarget,
    Capabilities,
    LLMRequest,
    LLMResponse,
    Message,
    StreamChunk,
    ToolCall,
    Usage,
)
from treadle.backends.tokens import CHARS, TokenEstimator

_SCRIPTED = BackendTarget(provider="treadle.scripted")

_WORDS = (
    "alpha bravo cedar delta ember fjord grove harbor island juniper kestrel lumen meadow "
    "north orchid prairie quartz river summit tundra umber valley willow xenon yarrow zephyr"
).split()


class ScriptedToolCall(BaseModel):
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class ScriptRule(BaseModel):
    """Answer requests whose latest user message matches `match` (a regex, searched).

    With `tool_calls`, the rule fires only before any tool result has come back for that
    user message; the model's next turn (after the results) falls through to later rules
    or to schema generation. `content` may be text or a JSON value; text may use
    `{tool_results}` (the results so far, one a line) and `{groups[N]}` from the match
    (escaped when the text is JSON). Other braces are left alone.
    """

    match: str = ""
    content: Any = None
    tool_calls: list[ScriptedToolCall] = Field(default_factory=list)

    @field_validator("match")
    @classmethod
    def _linear_time(cls, pattern: str) -> str:
        compile_rule(pattern)
        return pattern


def _re2_options() -> Any:
    options = re2.Options()
    options.dot_nl = True  # as `re.S`: `.` matches newlines too
    options.log_errors = False  # the error is raised (and reported) here, not printed
    return options


_OPTIONS = _re2_options()


@functools.lru_cache(maxsize=1024)
def compile_rule(pattern: str) -> Any:
    """`pattern` compiled by RE2; `ValueError` saying why RE2 refuses it."""
    try:
        return re2.compile(pattern, _OPTIONS)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise ValueError(
            f"{pattern!r} is not a pattern RE2 accepts ({reason}); rules use RE2 syntax, "
            "which has no backreferences or lookarounds"
        ) from None


class ScriptedBackend:
    """Deterministic stand-in for an LLM. `latency_s` adds a fixed delay per call; `tokens`
    counts the usage it reports (it has no tokenizer of its own)."""

    def __init__(
        self,
        rules: list[ScriptRule] | None = None,
        *,
        latency_s: float = 0.0,
        tokens: TokenEstimator = CHARS,
    ):
        self.rules = list(rules or [])
        self.latency_s = latency_s
        self.tokens = tokens
        self.calls = 0

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(streaming=True, tool_calls=True)

    @property
    def target(self) -> BackendTarget:
        return _SCRIPTED

    async def generate(self, request: LLMRequest) -> LLMResponse:
        self.calls += 1
        if self.latency_s:
            await anyio.sleep(self.latency_s)
        content, calls = self._answer(request)
        prompt_text = "".join(m.content or "" for m in request.messages)
        completion = content or "".join(c.arguments for c in calls)
        return LLMResponse(
            content=content,
            tool_calls=calls,
            finish_reason=tool_finish_reason(request, calls),
            usage=Usage(
                prompt_tokens=self.tokens.count(prompt_text),
                completion_tokens=self.tokens.count(completion),
            ),
            model=request.model,
        )

    async def stream(self, request: LLMRequest) -> AsyncIterator[StreamChunk]:
        response = await self.generate(request)
        for piece in re.findall(r"\S+\s*|\s+", response.content or ""):
            yield StreamChunk(delta=piece)
        yield StreamChunk(
            tool_calls=response.tool_calls,
            finish_reason=response.finish_reason,
            usage=response.usage,
        )

    # -- answering ---------------------------------------------------------------------

    def _answer(self, request: LLMRequest) -> tuple[str | None, list[ToolCall]]:
        last_user, results = _conversation_tail(request.messages)
        seed = _digest(json.dumps([m.model_dump() for m in request.messages], default=str))
        choice = _ToolChoice.of(request)
        for rule in self.rules:
            m = compile_rule(rule.match).search(last_user)
            if m is None:
                continue
            if rule.tool_calls:
                if results or not choice.allowed:
                    continue
                calls = [
                    ToolCall(
                        id=f"call_{i}_{_digest(last_user)[:8]}",
                        name=c.name,
                        arguments=json.dumps(c.arguments),
                    )
                    for i, c in enumerate(rule.tool_calls)
                ]
                if choice.name is not None:  # constrained to that function's call
                    calls = [c for c in calls if c.name == choice.name][:1]
                    if not calls:
                        return choice.forced_call(request.tools, seed, last_user)
                return None, calls
            if rule.content is None or choice.forced:
                continue
            return _render(rule.content, m, results), []
        if choice.forced:
            return choice.forced_call(request.tools, seed, last_user)
        if request.response_schema is not None:
            value = generate_from_schema(request.response_schema, seed)
            return json.dumps(value), []
        return f"Answer ({seed[:6]}): {' '.join(_words(seed, 8))}.", []


class _ToolChoice:
    """What a request's `tools` and `tool_choice` allow: no calls, calls, or a forced call."""

    __slots__ = ("allowed", "forced", "name")

    def __init__(self, allowed: bool, forced: bool, name: str | None) -> None:
        self.allowed = allowed
        self.forced = forced
        #: the function a named `tool_choice` forces
        self.name = name

    @classmethod
    def of(cls, request: LLMRequest) -> _ToolChoice:
        choice = request.tool_choice
        if not request.tools or choice == "none":
            return cls(False, False, None)
        if isinstance(choice, dict):
            name = str((choice.get("function") or {}).get("name", ""))
            return cls(True, True, name)
        return cls(True, choice == "required", None)

    def forced_call(
        self, tools: list[dict[str, Any]], seed: str, last_user: str
    ) -> tuple[str, list[ToolCall]]:
        """The call constrained decoding makes: to the named function (or the first tool),
        arguments that validate against its parameters. Content is empty, as vLLM's is."""
        functions = [t.get("function") or {} for t in tools]
        fn = next((f for f in functions if f.get("name") == self.name), functions[0])
        schema = fn.get("parameters") or {"type": "object", "properties": {}}
        arguments = generate_from_schema(schema, seed + str(fn.get("name")))
        call = ToolCall(
            id=f"call_0_{_digest(last_user)[:8]}",
            name=str(fn.get("name", "")),
            arguments=json.dumps(arguments),
        )
        return "", [call]


def tool_finish_reason(request: LLMRequest, calls: list[ToolCall]) -> str:
    """`finish_reason` of an answer, as OpenAI (and vLLM) give it: "tool_calls" when it
    calls tools, except for a call forced by a named `tool_choice`, which is "stop"."""
    return "tool_calls" if calls and not isinstance(request.tool_choice, dict) else "stop"


def _conversation_tail(messages: list[Message]) -> tuple[str, list[str]]:
    """The latest user message and the tool results that came after it."""
    results: list[str] = []
    for msg in reversed(messages):
        if msg.role == "tool":
            results.append(msg.content or "")
        elif msg.role == "user":
            return msg.content or "", list(reversed(results))
    return "", list(reversed(results))


_PLACEHOLDER = re.compile(r"\{(tool_results|groups\[(\d+)\])\}")


def _render(content: Any, match: Any, results: list[str]) -> str:
    """Fill `{tool_results}` and `{groups[N]}`; inside JSON content, values are escaped."""
    if not isinstance(content, str):
        return json.dumps(content)
    groups = [match.group(0), *match.groups()]
    is_json = content.lstrip().startswith(("{", "["))

    def fill(m: re.Match[str]) -> str:
        if m.group(2) is not None:
            index = int(m.group(2))
            value = (groups[index] or "") if index < len(groups) else ""
        else:
            value = "\n".join(results)
        return json.dumps(value)[1:-1] if is_json else value

    return _PLACEHOLDER.sub(fill, content)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _words(seed: str, n: int) -> list[str]:
    return [_WORDS[int(seed[i * 2 : i * 2 + 2], 16) % len(_WORDS)] for i in range(n)]


def generate_from_schema(schema: dict[str, Any], seed: str) -> Any:
    """A deterministic value that validates against `schema` (the subset pydantic emits)."""
    defs = schema.get("$defs", {})

    def gen(s: dict[str, Any], path: str) -> Any:
        h = _digest(seed + path)
        if "$ref" in s:
            return gen(defs[s["$ref"].rsplit("/", 1)[-1]], path)
        if "const" in s:
            return s["const"]
        if "enum" in s:
            return s["enum"][int(h[:4], 16) % len(s["enum"])]
        if "default" in s and s.get("type") not in ("object", "array"):
            return s["default"]
        for key in ("anyOf", "oneOf"):
            if key in s:
                options = [o for o in s[key] if o.get("type") != "null"] or s[key]
                return gen(options[0], path)
        if "allOf" in s:
            return gen(s["allOf"][0], path)
        kind = s.get("type", "string")
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), "null")
        if kind == "object":
            props = s.get("properties", {})
            if not props and isinstance(s.get("additionalProperties"), dict):
                return {w: gen(s["additionalProperties"], f"{path}.{w}") for w in _words(h, 2)}
            return {k: gen(v, f"{path}.{k}") for k, v in props.items()}
        if kind == "array":
            if "prefixItems" in s:
                return [gen(x, f"{path}[{i}]") for i, x in enumerate(s["prefixItems"])]
            n = max(int(s.get("minItems", 0)), min(int(s.get("maxItems", 3)), 3))
            return [gen(s.get("items", {}), f"{path}[{i}]") for i in range(n)]
        if kind == "integer":
            lo = int(s.get("minimum", 0))
            hi = int(s.get("maximum", lo + 100))
            return lo + int(h[:6], 16) % (hi - lo + 1)
        if kind == "number":
            low = float(s.get("minimum", 0.0))
            high = float(s.get("maximum", low + 1.0))
            return round(low + (int(h[:6], 16) / 0xFFFFFF) * (high - low), 4)
        if kind == "boolean":
            return int(h[0], 16) % 2 == 0
        if kind == "null":
            return None
        text = " ".join(_words(h, 4))
        lo_len = int(s.get("minLength", 0))
        text = (text + " " + text * (lo_len // max(len(text), 1) + 1))[: max(lo_len, len(text))]
        if "maxLength" in s:
            text = text[: int(s["maxLength"])]
        return text

    return gen(schema, "$")
