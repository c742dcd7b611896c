"""What the run page shows, as JSON: the run, each node's status, inputs, output and error,
the timeline (`treadle.runtime.observe.timeline`, the data behind `treadle trace`) and the
requests for input it waits on.

The page fetches it when it opens and again (at most a few times a second) while the run's
events arrive; node colours and token streams it updates from the events themselves.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from treadle.graphs.outline import GraphOutline
from treadle.graphs.spec import INPUT, FirstOf, Ref
from treadle.runtime.core.events import (
    Event,
    InputRequested,
    NodeFailed,
    NodeFinished,
    NodeSkipped,
    NodeStarted,
    RunWaiting,
)
from treadle.runtime.core.store import RunRecord
from treadle.runtime.observe.timeline import build_timeline

#: a value shown in the page is cut to this many characters of JSON
MAX_VALUE_CHARS = 4000
_UNSET = object()


def node_statuses(events: Sequence[Event]) -> dict[str, str]:
    """Each node instance's last status by the events: running, done, failed, skipped,
    waiting (an `ask` node waiting for its answer)."""
    status: dict[str, str] = {}
    for event in events:
        if isinstance(event, NodeStarted):
            status[event.node] = "running"
        elif isinstance(event, NodeFinished):
            status[event.node] = "done"
        elif isinstance(event, NodeFailed):
            status[event.node] = "failed"
        elif isinstance(event, NodeSkipped):
            status[event.node] = "skipped"
        elif isinstance(event, InputRequested):
            status[event.node] = "waiting"
        elif isinstance(event, RunWaiting):
            for node in event.nodes:
                status[node] = "waiting"
    return status


def _clip(value: Any) -> Any:
    """`value`, or its JSON cut short when it is long (the page is not a data viewer)."""
    text = json.dumps(value, default=str)
    if len(text) <= MAX_VALUE_CHARS:
        return value
    return {"truncated": True, "json": text[:MAX_VALUE_CHARS] + "…"}


def _at(value: Any, path: Sequence[str]) -> Any:
    for part in path:
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return _UNSET
    return value


def _resolve(binding: Any, run_inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> Any:
    """What a node input was (or will be) given: a literal, or the value a reference
    points at once its node has finished (`_UNSET` before)."""
    if isinstance(binding, FirstOf):
        for ref in binding.refs:
            value = _resolve(ref, run_inputs, outputs)
            if value is not _UNSET:
                return value
        return _UNSET
    if not isinstance(binding, Ref):
        return binding
    if binding.node == INPUT:
        return _at(run_inputs, binding.path)
    if binding.node in outputs:
        return _at(outputs[binding.node], binding.path)
    return _UNSET


def _decoded(outputs: Mapping[str, bytes]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, raw in outputs.items():
        if "$" in key:  # journal entries of requests and answers, not node outputs
            continue
        try:
            found[key] = json.loads(raw)
        except ValueError:
            found[key] = raw.decode("utf-8", "replace")
    return found


def run_state(
    record: RunRecord,
    status: str,
    events: Sequence[Event],
    outputs: Mapping[str, bytes],
    outline: GraphOutline | None,
) -> dict[str, Any]:
    """The page's JSON for one run (`status`: as the API reports it)."""
    values = _decoded(outputs)
    statuses = node_statuses(events)
    errors: dict[str, str] = {}
    for event in events:
        if isinstance(event, NodeFailed):
            errors[event.node] = event.error
    nodes: list[dict[str, Any]] = []
    for node in outline.nodes if outline is not None else []:
        inputs = {}
        for name, binding in node.inputs.items():
            value = _resolve(binding, record.inputs, values)
            inputs[name] = None if value is _UNSET else _clip(value)
        instances = [k for k in values if k != node.id and _instance_of(k) == node.id]
        nodes.append({
            "id": node.id,
            "kind": node.kind,
            "status": statuses.get(node.id, "pending"),
            "inputs": inputs,
            "output": _clip(values[node.id]) if node.id in values else None,
            "has_output": node.id in values,
            "error": errors.get(node.id),
            "instances": len(instances),
        })  # fmt: skip
    timeline = build_timeline(events).to_dict() if events else None
    return {
        "run": {
            "run_id": record.run_id,
            "workflow": record.graph,
            "workflow_version": record.meta.get("workflow_version"),
            "status": status,
            "created_at": record.created_at,
            "updated_at": record.updated_at,
            "inputs": _clip(record.inputs),
            "output": _clip(record.output),
            "error": record.error,
            "pending_inputs": [r.model_dump(mode="json") for r in record.pending_inputs],
        },
        "last_seq": events[-1].seq if events else 0,
        "nodes": nodes,
        "timeline": timeline,
    }


def _instance_of(key: str) -> str:
    """The top-level node an instance key belongs to (`m[3]` → `m`, `sub/x` → `sub`)."""
    for i, char in enumerate(key):
        if char in "[/":
            return key[:i]
    return key
