"""treadle's hints on the wire to `treadle gateway`: one JSON object under the body's
`treadle` field (what OpenAI clients send as `extra_body={"treadle": {...}}`), or the same
fields as `X-Treadle-*` headers for clients that cannot set a body field.

Both sides use this module: the `gateway` dialect writes it (`to_wire`), the gateway reads
it (`WireHints.parse`). Every field is optional; a client that sends none is a one-call
program.

| field | header | meaning |
|---|---|---|
| `program_id` | `X-Treadle-Program-Id` | the agent program (run) the call belongs to |
| `tenant` | `X-Treadle-Tenant` | whose share the call's service counts against |
| `steps_to_execution` | `X-Treadle-Steps-To-Execution` | LLM steps left after this one |
| `last_llm_step` | `X-Treadle-Last-Llm-Step` | the program's last LLM call (it ends after it) |
| `next_tool` | `X-Treadle-Next-Tool` | the tool the program runs after this call |
| `tool_duration_s` | `X-Treadle-Tool-Duration-S` | that tool's predicted seconds |
| `human_wait` | `X-Treadle-Human-Wait` | after this call the program waits for a person |
| `remaining_cost_s` | `X-Treadle-Remaining-Cost-S` | estimated work left (critical path) |
| `request_id` | `X-Treadle-Request-Id` | the caller's id of this call |

Plain clients may also name a session (`X-Session-Id` or `X-Treadle-Session`): calls of
one session are one program, so they keep their replica (session affinity).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from treadle.backends.base import SchedulingHints
from treadle.errors import GatewayError

#: the body field that carries the hints
BODY_FIELD = "treadle"
HEADER_PREFIX = "x-treadle-"
SESSION_HEADERS = ("x-treadle-session", "x-session-id")

_FLAGS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


class HintError(GatewayError, ValueError):
    """Hints that cannot be read; the message names the field and what is wrong."""


class WireHints(BaseModel):
    """The hints of one call as the gateway receives them (module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    program_id: str | None = Field(default=None, min_length=1, max_length=256)
    tenant: str | None = Field(default=None, min_length=1, max_length=128)
    steps_to_execution: int | None = Field(default=None, ge=0)
    last_llm_step: bool = False
    next_tool: str | None = Field(default=None, max_length=128)
    tool_duration_s: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    human_wait: bool = False
    remaining_cost_s: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    request_id: str | None = Field(default=None, max_length=256)

    @classmethod
    def parse(cls, body_field: Any, headers: Mapping[str, str]) -> WireHints:
        """Hints from the body's `treadle` field, else from `X-Treadle-*` headers (the body
        wins field by field). `HintError` says which field is wrong."""
        raw: dict[str, Any] = {}
        for key, value in headers.items():
            low = key.lower()
            if not low.startswith(HEADER_PREFIX) or low == SESSION_HEADERS[0]:
                continue
            name = low[len(HEADER_PREFIX) :].replace("-", "_")
            if name not in cls.model_fields:
                raise HintError(
                    f"unknown header {_header(name)}; treadle headers: "
                    + ", ".join(_header(f) for f in cls.model_fields)
                )
            if name in ("last_llm_step", "human_wait"):
                flag = _FLAGS.get(value.strip().lower())
                if flag is None:
                    raise HintError(f"header {_header(name)} must be true or false, got {value!r}")
                raw[name] = flag
            else:
                raw[name] = value
        from_headers = set(raw)
        if body_field is not None:
            if not isinstance(body_field, dict):
                raise HintError(
                    f"'{BODY_FIELD}' must be an object, got {type(body_field).__name__}"
                )
            raw.update(body_field)
            from_headers -= set(body_field)
        if not raw:
            return _EMPTY
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            name = str(first["loc"][0]) if first["loc"] else ""
            if name in from_headers:
                raise HintError(f"header {_header(name)}: {first['msg']}") from None
            where = ".".join(str(p) for p in first["loc"]) or BODY_FIELD
            raise HintError(f"{BODY_FIELD}.{where}: {first['msg']}") from None

    @classmethod
    def from_hints(cls, hints: SchedulingHints) -> WireHints:
        return cls(
            program_id=hints.program_id,
            tenant=hints.tenant,
            steps_to_execution=hints.steps_to_execution,
            last_llm_step=hints.is_last_step,
            next_tool=hints.next_tool,
            tool_duration_s=hints.tool_duration_s,
            human_wait=hints.human_wait,
            request_id=hints.request_id,
        )

    def to_wire(self) -> dict[str, Any]:
        """The body field's value: only the fields that are set."""
        return self.model_dump(exclude_defaults=True)


def session_of(headers: Mapping[str, str]) -> str | None:
    """A plain client's session, from `X-Treadle-Session` or `X-Session-Id`."""
    for name in SESSION_HEADERS:
        value = headers.get(name)
        if value:
            return value[:256]
    return None


def _header(field: str) -> str:
    return "X-Treadle-" + "-".join(p.capitalize() for p in field.split("_"))


_EMPTY = WireHints()
