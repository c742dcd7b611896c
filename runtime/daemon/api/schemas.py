"""Request and response bodies of the HTTP API (they make its OpenAPI schema)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from treadle.runtime.core.store import RunStatus
from treadle.runtime.core.waiting import InputRequest
from treadle.runtime.daemon.registry import WorkflowInfo
from treadle.runtime.daemon.runs import RunView


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(BaseModel):
    code: str = Field(description="A stable, machine-readable error code.")
    message: str = Field(description="What is wrong, for a person.")
    details: list[dict[str, Any]] | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class WorkflowIn(_Strict):
    definition: str = Field(
        min_length=1, description="The workflow file's text (YAML or JSON).", max_length=1 << 20
    )
    format: Literal["yaml", "json"] = "yaml"
    filename: str | None = Field(
        None,
        max_length=200,
        pattern=r"^[A-Za-z0-9_.\-]+$",
        description="Used in error messages (file:line:col) instead of <definition>.",
    )


class WorkflowOut(WorkflowInfo):
    """A registered workflow: its current definition's digest and version."""


class WorkflowDetail(WorkflowOut):
    definition: str


class WorkflowList(BaseModel):
    workflows: list[WorkflowOut]


class WorkflowVersions(BaseModel):
    versions: list[WorkflowOut] = Field(description="Every version, oldest first.")


class RunIn(_Strict):
    # the README's example workflow (examples/research.yaml), registered
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "workflow": "research",
                    "inputs": {"question": "How do serving engines make LLM agents fast?"},
                }
            ]
        },
    )

    workflow: str = Field(min_length=1, max_length=100, description="A registered name.")
    inputs: dict[str, Any] = Field(default_factory=dict)
    version: int | None = Field(
        None, ge=1, description="Run this version of the workflow (default: the latest)."
    )


class PendingInput(InputRequest):
    """A request for human input a waiting run has open: what a form asks. Answer it with
    POST /v1/runs/{run_id}/input."""


class InputIn(_Strict):
    value: Any = Field(
        description="The answer: a JSON value that matches the request's `answer_schema`."
    )
    node: str | None = Field(
        None,
        min_length=1,
        max_length=500,
        description="The request answered (`pending_inputs[].node`); may be left out when "
        "the run waits on one request.",
    )
    key: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="Idempotency key: posting the same answer with the same key again is "
        "accepted and changes nothing (a retry after a lost reply).",
    )


class InputOut(BaseModel):
    run_id: str
    node: str = Field(description="The request answered.")
    replayed: bool = Field(description="True: this key's answer was recorded before.")
    status: RunStatus = Field(description="The run's status now (queued: pending).")
    pending_inputs: list[PendingInput] = Field(description="Requests still open.")


class RunOut(BaseModel):
    run_id: str
    workflow: str
    status: RunStatus
    created_at: float
    updated_at: float
    inputs: dict[str, Any]
    output: Any = None
    error: str | None = None
    workflow_version: int | None = None
    cancel_requested: bool = False
    trace_id: str | None = Field(None, description="From the traceparent given on submit.")
    pending_inputs: list[PendingInput] = Field(
        default_factory=list,
        description="While `waiting`: the requests for human input the run waits on.",
    )

    @classmethod
    def of(cls, view: RunView, *, full: bool = True) -> RunOut:
        r = view.record
        version = r.meta.get("workflow_version")
        parent = r.meta.get("traceparent")
        return cls(
            run_id=r.run_id,
            workflow=r.graph,
            status=view.status,
            created_at=r.created_at,
            updated_at=r.updated_at,
            inputs=r.inputs,
            output=r.output if full else None,
            error=r.error,
            workflow_version=int(version) if version and version.isdigit() else None,
            cancel_requested=view.cancel_requested,
            trace_id=parent.split("-")[1] if parent else None,
            pending_inputs=[PendingInput(**p.model_dump()) for p in r.pending_inputs],
        )


class RunList(BaseModel):
    runs: list[RunOut]
    next_cursor: str | None = Field(None, description="Pass as ?cursor= for the next page.")


class TenantOut(BaseModel):
    tenant: str
    max_concurrent_runs: int
    tokens_per_minute: int | None
    active_runs: int
    tokens_this_minute: int


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    redis: str
