"""Every route of the API, and every dependency it declares, is a coroutine: FastAPI runs a
plain `def` in a worker thread, a thread hand-off (and a fight for the GIL) per request
for what is an attribute read or a check."""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from typing import Any

from daemon_support import make_config
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from treadle.runtime.daemon.api.app import create_app


def _routes(routes: Sequence[Any]) -> Iterator[APIRoute]:
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        # included routers (kept whole by FastAPI >= 0.16x) and mounted apps
        inner = getattr(route, "original_router", None) or getattr(route, "app", None)
        yield from _routes(getattr(inner, "routes", ()))


def _calls(dependant: Dependant) -> Iterator[Any]:
    for sub in dependant.dependencies:
        yield sub.call
        yield from _calls(sub)


def _is_coroutine(call: Any) -> bool:
    return inspect.iscoroutinefunction(call) or inspect.iscoroutinefunction(
        getattr(call, "__call__", None)  # noqa: B004 (security schemes are callable objects)
    )


def test_no_route_or_dependency_runs_in_a_thread() -> None:
    app = create_app(make_config("redis://127.0.0.1:1/0"), workers=0)
    routes = list(_routes(app.routes))
    assert len(routes) > 10
    in_threads = sorted(
        f"{route.path} {getattr(call, '__name__', call)}"
        for route in routes
        for call in (route.endpoint, *_calls(route.dependant))
        if call is not None and not _is_coroutine(call)
    )
    assert in_threads == []
