"""Every error the API returns is JSON: `{"error": {"code", "message", "details"?}}`.

Domain exceptions map to status codes here, in one place: a body that is not JSON 415 (by
its Content-Type) or 400 (it does not parse), unknown ids 404, a method the path does not
have 405 (`Allow` lists every method it has), state conflicts 409, invalid requests and
definitions 422, quotas and tenant limits 429 with `Retry-After`, Redis unavailable 503 with
`Retry-After`. Anything else is a bug: 500, logged with its traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

from treadle.errors import DaemonError
from treadle.runtime.daemon.api.options import allowed_methods
from treadle.runtime.daemon.checker import CheckFailed, DefinitionError
from treadle.runtime.daemon.quotas import QuotaExceeded
from treadle.runtime.daemon.runs import Conflict, InvalidRequest, NotFound
from treadle.runtime.daemon.tenants import TenantError

log = logging.getLogger(__name__)

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    408: "request_timeout",
    409: "conflict",
    413: "request_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "quota_exceeded",
    503: "unavailable",
}


class ApiError(DaemonError):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code or _CODES.get(status, "error")
        self.message = message
        self.headers = dict(headers or {})


def error_response(
    status: int,
    message: str,
    *,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
    details: Sequence[Mapping[str, Any]] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {"code": code or _CODES.get(status, "error"), "message": message}
    if details:
        body["details"] = [dict(d) for d in details]
    return JSONResponse({"error": body}, status_code=status, headers=dict(headers or {}))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(_r: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, code=exc.code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            where = next(e for e in errors if e.get("type") == "json_invalid")
            reason = (where.get("ctx") or {}).get("error", "it does not parse")
            at = where.get("loc", ("body", "?"))[-1]
            return error_response(400, f"the body is not valid JSON: {reason} (at character {at})")
        if _body_not_json(request, errors):
            return error_response(
                415, "the body must be JSON: send it with Content-Type: application/json"
            )
        details = [
            {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")),
             "type": str(e.get("type", ""))}
            for e in errors
        ]  # fmt: skip
        message = "; ".join(f"{'.'.join(d['loc'][1:]) or d['loc'][0]}: {d['msg']}" for d in details)
        return error_response(422, message or "invalid request", details=details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(allowed_methods(request.app, request.scope))
            message = f"{request.method} is not allowed here (allowed: {headers['Allow']})"
        elif exc.status_code == 400 and message == "There was an error parsing the body":
            message = "the body is not valid JSON (or not UTF-8)"
        return error_response(exc.status_code, message, headers=headers)

    @app.exception_handler(NotFound)
    async def _not_found(_r: Request, exc: NotFound) -> JSONResponse:
        return error_response(404, str(exc.args[0]) if exc.args else "not found")

    @app.exception_handler(Conflict)
    async def _conflict(_r: Request, exc: Conflict) -> JSONResponse:
        return error_response(409, str(exc))

    @app.exception_handler(InvalidRequest)
    async def _invalid(_r: Request, exc: InvalidRequest) -> JSONResponse:
        return error_response(422, str(exc))

    @app.exception_handler(DefinitionError)
    async def _definition(_r: Request, exc: DefinitionError) -> JSONResponse:
        return error_response(422, str(exc), code="invalid_workflow")

    @app.exception_handler(TenantError)
    async def _tenant(_r: Request, exc: TenantError) -> JSONResponse:
        return error_response(422, str(exc))

    @app.exception_handler(QuotaExceeded)
    async def _quota(_r: Request, exc: QuotaExceeded) -> JSONResponse:
        return error_response(429, str(exc), headers={"Retry-After": str(exc.retry_after_s)})

    @app.exception_handler(CheckFailed)
    async def _checker(_r: Request, exc: CheckFailed) -> JSONResponse:
        log.warning("definition checker: %s", exc)
        return error_response(503, str(exc), headers={"Retry-After": "1"})

    @app.exception_handler(RedisError)
    async def _redis(_r: Request, exc: RedisError) -> JSONResponse:
        log.warning("Redis unavailable: %s", exc)
        return error_response(
            503, "the state store is unavailable; retry shortly", headers={"Retry-After": "1"}
        )

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal error", code="internal_error")


def _body_not_json(request: Request, errors: Sequence[Any]) -> bool:
    """Whether the body failed validation because it came as something other than JSON
    (FastAPI then hands the raw bytes to the model)."""
    mime = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if not mime or mime == "application/json" or mime.endswith("+json"):
        return False
    return any(tuple(e.get("loc", ())) == ("body",) for e in errors)
