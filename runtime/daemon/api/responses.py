"""The error answers each operation documents in the OpenAPI schema, in one place, so that
what the schema promises is what the API answers (schemathesis checks it: tests/daemon)."""

from __future__ import annotations

from typing import Any

from treadle.runtime.daemon.api.schemas import ErrorBody

_DESCRIPTIONS: dict[int, str] = {
    400: "The body is not valid JSON.",
    401: "Missing or invalid API key.",
    404: "No such run or workflow for this tenant.",
    408: "The request body did not arrive in time.",
    409: "The run has finished.",
    413: "The request body is too large.",
    415: "The body is not JSON (send Content-Type: application/json).",
    422: "Invalid request.",
    429: "A limit of the tenant is reached (request rate, requests in progress, event "
    "streams, or a quota); see Retry-After.",
    503: "The state store is unavailable, or the server serves as many event streams as it "
    "can; see Retry-After.",
}

#: what any authenticated operation may answer
TENANT = (401, 422, 429, 503)
#: and one that takes a JSON body
JSON_BODY = (*TENANT, 400, 408, 413, 415)


def errors(*codes: int, **descriptions: str) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: each code with the error body and its description
    (`descriptions` overrides one: `e404="..."`)."""
    return {
        code: {
            "model": ErrorBody,
            "description": descriptions.get(f"e{code}", _DESCRIPTIONS[code]),
        }
        for code in sorted(set(codes))
    }
