"""How the durable stores turn run records and events into bytes and back.

Compact JSON throughout (no whitespace, UTF-8, not ASCII-escaped), so a record written by one
store can be read by any tool that speaks JSON. Events round-trip exactly through
`Event.to_dict` / `event_from_dict`: their fields are str, int, float, bool, None and lists of
str, which JSON keeps as they are (floats are written with `repr`, so they come back bit for
bit; NaN and infinities use Python's JSON extension). A `RunRecord`'s free-form values
(`inputs`, `output`) must be JSON values: anything else is refused with a clear error rather
than silently turned into a string (tuples, which JSON has no name for, come back as lists).

The helpers that check a journal batch and apply `update_run` changes live here too, so the
sqlite and redis stores enforce the same rules.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from treadle.errors import StoreError
from treadle.runtime.core.events import Event, event_from_dict
from treadle.runtime.core.store import RunRecord

_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, check_circular=False)
_DECODER = json.JSONDecoder()


class JournalError(StoreError, ValueError):
    """A batch of events does not continue the run's journal (seqs must increase from 1)."""


def dumps(value: Any) -> str:
    """Compact JSON text; raises `TypeError` for a value JSON cannot represent."""
    return _ENCODER.encode(value)


def loads(data: str | bytes) -> Any:
    if isinstance(data, bytes | bytearray | memoryview):
        data = bytes(data).decode("utf-8")
    return _DECODER.decode(data)


def encode_record(record: RunRecord) -> str:
    """A run record as compact JSON; a field that is not a JSON value is a `ValueError`."""
    data = record.model_dump()
    try:
        return dumps(data)
    except (TypeError, ValueError) as exc:
        bad = [name for name, value in data.items() if not _is_json(value)]
        where = f" (field {', '.join(bad)})" if bad else ""
        raise ValueError(
            f"run {record.run_id!r}: the record cannot be stored as JSON{where}: {exc}"
        ) from exc


def decode_record(data: str | bytes) -> RunRecord:
    return RunRecord.model_validate(loads(data))


def encode_event(event: Event) -> str:
    try:
        return dumps(event.to_dict())
    except (TypeError, ValueError) as exc:
        raise ValueError(f"event {event!r} cannot be stored as JSON: {exc}") from exc


def decode_event(data: str | bytes) -> Event:
    return event_from_dict(loads(data))


def check_batch(events: Sequence[Event], last_seq: int | None = None) -> None:
    """Refuse a batch whose seqs do not strictly increase (from above `last_seq` if given).

    The journal is ordered by seq and read back with `after_seq`; a repeated or smaller seq
    would mean two writers on one run or an orchestrator bug, so it is an error, not a merge.
    """
    prev = last_seq or 0
    for ev in events:
        if not isinstance(ev, Event):
            raise TypeError(f"not an Event: {ev!r}")
        if ev.seq <= prev:
            raise JournalError(
                f"run {ev.run_id!r}: event seq {ev.seq} must be greater than {prev} "
                "(seqs start at 1 and each batch continues the journal)"
            )
        prev = ev.seq


def check_outputs(outputs: Mapping[str, bytes] | None) -> dict[str, bytes]:
    """Outputs are JSON bytes keyed by node instance id; anything else is a `TypeError`."""
    if not outputs:
        return {}
    out: dict[str, bytes] = {}
    for node, value in outputs.items():
        if not isinstance(node, str) or not node:
            raise TypeError(f"output keys must be non-empty node instance ids, got {node!r}")
        if not isinstance(value, bytes | bytearray | memoryview):
            raise TypeError(f"output of node {node!r} must be bytes, got {type(value).__name__}")
        out[node] = bytes(value)
    return out


def apply_changes(record: RunRecord, changes: Mapping[str, Any]) -> RunRecord:
    """`record` with `changes` applied and validated, and `updated_at` set to now.

    Unknown fields and ill-typed values (a status that is not a
    `RunStatus`) are errors: a durable store must never hold a record it cannot read back.
    """
    unknown = set(changes) - set(RunRecord.model_fields)
    if unknown:
        raise ValueError(f"run {record.run_id!r}: unknown run field(s) {sorted(unknown)}")
    data = record.model_dump()
    data.update(changes)
    data["updated_at"] = time.time()
    return RunRecord.model_validate(data)


def check_page(limit: int, offset: int) -> None:
    if limit < 0 or offset < 0:
        raise ValueError(f"limit and offset must be >= 0 (got limit={limit}, offset={offset})")


def _is_json(value: Any) -> bool:
    try:
        dumps(value)
    except (TypeError, ValueError):
        return False
    return True
