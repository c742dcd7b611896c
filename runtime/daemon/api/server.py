"""How the API is served: uvicorn with limits a hostile client cannot get around.

uvicorn times out idle keep-alive connections, but not a connection that has sent part of a
request's head: one that sends headers slowly, or never finishes them, holds its socket
forever, and a thousand of them exhaust the process's file descriptors (the daemon then
accepts nobody). `GuardedH11Protocol` gives every request's head `header_timeout_s` from
the connection's start (or the previous response's end) and closes the connection when it
has not arrived in full by then, however slowly it is dripping in; the body's own time
limit is `BodyLimitMiddleware`'s (408). `serve()` also raises the process's open-files
limit to its hard maximum, so the descriptors an attacker can hold for those seconds are
many more than it takes to keep answering everybody else.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from treadle.runtime.daemon.config import DaemonConfig

log = logging.getLogger(__name__)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request's head (module docstring)."""

    header_timeout_s: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request's head has arrived: its cycle began
            self._disarm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.cycle is not None:
            # the next request's head gets its own deadline (the keep-alive timeout, which
            # uvicorn cancels on the first byte, would let a slow head through)
            self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_too_slow)

    def _disarm_head_timer(self) -> None:
        timer = getattr(self, "_head_timer", None)
        if timer is not None:
            timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a request is being answered; its head arrived in time
        if not self.transport.is_closing():
            self.transport.close()


def protocol_for(config: DaemonConfig) -> type[GuardedH11Protocol]:
    return type(
        "GuardedH11Protocol",
        (GuardedH11Protocol,),
        {"header_timeout_s": config.header_timeout_s},
    )


def uvicorn_config(
    app: Any,
    config: DaemonConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    log_level: str = "info",
    access_log: bool = False,
) -> uvicorn.Config:
    """The daemon's server settings, for `treadle serve` and the tests' live servers."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol_for(config),
        log_level=log_level.lower(),
        access_log=access_log,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=5,
        backlog=4096,
    )


def raise_open_files_limit() -> int:
    """Raise the soft limit on open files to the hard one; returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-files limit from %d: %s", soft, exc)
    return soft


def serve(app: Any, config: DaemonConfig, **options: Any) -> None:
    """Serve `app` until SIGTERM/SIGINT (`treadle serve`)."""
    limit = raise_open_files_limit()
    log.info("open-files limit: %d", limit)
    uvicorn.Server(uvicorn_config(app, config, **options)).run()
