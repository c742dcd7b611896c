"""Tenants' workflow definitions are loaded, checked and compiled in a child process of the
API, never in the API's own.

A definition is a tenant's text, and loading it costs CPU in proportion to its size (the
default limit, 256 KB of YAML, takes seconds). In the API's process that time would be
taken from every tenant's requests; a worker thread does not help, because it holds the GIL
the event loop needs (measured here: a trivial request's p99 went from 0.2 ms to 29 ms while
a thread parsed YAML). So the API asks a `DefinitionChecker`: a child process (`python -m
treadle.runtime.daemon.checker`) that checks and compiles definitions for registering
(`check`), keeps the compiled graphs by digest, validates each new run's inputs against
them (`validate`), checks answers to runs' requests for input (`answer`) and gives the
declared graph's outline for the web view to draw (`outline`). It must answer within
`timeout_s`, else it is killed, the request fails with a clear error, and the next request
starts a fresh child. The child's CPU is shared with the API's by the operating system's
scheduler, not by one event loop.

The parent talks to its child over pipes, one request at a time, waiting on the pipes'
file descriptors on whichever event loop asks (no thread hand-off: a submission's inputs
cost a pipe round trip). `checker_for` keeps one checker per configuration and thread, so
the event loops a thread runs one after another (tests) share its child. Messages are
pickles, length-prefixed (both ends are this code).
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import pickle
import struct
import subprocess
import sys
import threading
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import IO, Any

import anyio

from treadle.errors import DaemonError
from treadle.graphs.compile import CompiledGraph
from treadle.graphs.outline import GraphOutline, outline_of
from treadle.runtime.daemon.child_env import child_env
from treadle.runtime.daemon.definitions import (
    DefinitionError,
    DefinitionLoader,
    Summary,
    definition_digest,
)
from treadle.runtime.daemon.import_allowlist import ImportAllowList
from treadle.runtime.daemon.worker import ProgramError
from treadle.runtime.execution.inputs import InputRejected, answer_value
from treadle.runtime.execution.runtime import InvalidInputs

log = logging.getLogger(__name__)

_HEADER = struct.Struct("!I")
#: how long a new child may take to start (import treadle) before it is given up on
_START_TIMEOUT_S = 120.0
#: compiled graphs the child keeps for validating inputs
_CACHE_SIZE = 256


class CheckFailed(DaemonError, RuntimeError):
    """The checker could not answer (it took too long, or its process died)."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


@dataclass(frozen=True)
class Settings:
    """What the child needs to check definitions as the registry would."""

    allow_imports: tuple[str, ...]
    allow_backends: tuple[str, ...]
    models: tuple[str, ...]
    max_bytes: int


#: where the parent reads a definition's (format, text) when the child does not have it
LoadDefinition = Callable[[], Awaitable[tuple[str, str] | None]]


class DefinitionChecker:
    def __init__(self, settings: Settings, timeout_s: float = 10.0) -> None:
        self.settings = settings
        self.timeout_s = timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        #: one exchange at a time, on each event loop (a checker serves one thread)
        self._locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, anyio.Lock] = (
            weakref.WeakKeyDictionary()
        )

    async def start(self) -> None:
        """Start the child now (the API's startup), so the first request does not wait for
        it to import treadle; a failure is logged and the next request tries again."""
        async with self._lock():
            try:
                await self._child()
            except CheckFailed as exc:
                log.warning("%s; the next request starts it again", exc)

    async def check(self, text: str, fmt: str, filename: str) -> Summary:
        """Check and compile a definition; `DefinitionError` says what is wrong with it."""
        try:
            reply = await self._ask(("check", text, fmt, filename))
        except CheckFailed as exc:
            if exc.timed_out:  # the definition's own doing
                raise DefinitionError(f"{filename}: {exc}") from None
            raise
        if reply[0] == "refused":
            raise DefinitionError(reply[1])
        summary: Summary = reply[1]
        return summary

    async def validate(
        self, digest: str, inputs: Mapping[str, Any], load: LoadDefinition
    ) -> tuple[str, dict[str, Any]]:
        """(graph name, inputs as the run's record keeps them); `InvalidInputs` when they do
        not match, `ProgramError` when the definition is gone or no longer loads."""
        reply = await self._about(digest, load, "inputs", dict(inputs))
        if reply[0] == "invalid":
            raise InvalidInputs(reply[1])
        return reply[1], reply[2]

    async def outline(self, digest: str, load: LoadDefinition) -> GraphOutline:
        """The stored definition's graph as declared (for drawing it); `ProgramError` when
        it is gone or no longer loads."""
        reply = await self._about(digest, load, "outline")
        found: GraphOutline = reply[1]
        return found

    async def answer(self, digest: str, load: LoadDefinition, node: str, value: Any) -> Any:
        """`value` checked against the `ask` instance `node`, as the answer keeps it;
        `InputRejected` when it does not fit, `ProgramError` as `spec`."""
        reply = await self._about(digest, load, "answer", node, value)
        if reply[0] == "rejected":
            raise InputRejected(reply[1])
        return reply[1]

    async def _about(
        self, digest: str, load: LoadDefinition, op: str, *args: Any
    ) -> tuple[Any, ...]:
        """Ask `op` about the definition `digest`, sending its text only when the child
        does not hold it compiled; a "refused" answer raises `ProgramError`."""
        reply = await self._ask((op, digest, None, None, *args))
        if reply[0] == "need":
            found = await load()
            if found is None:
                raise ProgramError(f"no workflow definition with digest {digest}")
            fmt, text = found
            reply = await self._ask((op, digest, text, fmt, *args))
        if reply[0] == "refused":
            raise ProgramError(reply[1])
        return reply

    def _lock(self) -> anyio.Lock:
        loop = asyncio.get_running_loop()
        lock = self._locks.get(loop)
        if lock is None:
            lock = self._locks[loop] = anyio.Lock()
        return lock

    async def _ask(self, message: tuple[Any, ...]) -> tuple[Any, ...]:
        payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        async with self._lock():
            proc = await self._child()
            assert proc.stdin is not None and proc.stdout is not None
            done = False
            try:
                with anyio.fail_after(self.timeout_s):
                    await _send(proc.stdin.fileno(), payload)
                    reply = await _receive(proc.stdout.fileno())
                done = True
            except TimeoutError:
                raise CheckFailed(
                    f"loading the definition took longer than {self.timeout_s:g} s; it is "
                    "too large or too complex to load here",
                    timed_out=True,
                ) from None
            except (OSError, EOFError) as exc:
                raise CheckFailed(f"the definition checker failed ({exc}); retry") from None
            finally:
                if not done:  # an exchange cut short leaves the pipes out of step
                    self._kill()
        answer: tuple[Any, ...] = pickle.loads(reply)
        return answer

    async def _child(self) -> subprocess.Popen[bytes]:
        """The running child, started if need be: its start (importing treadle) is not
        counted in any request's time limit."""
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        self._kill()
        proc = self._proc = subprocess.Popen(
            [sys.executable, "-m", "treadle.runtime.daemon.checker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=child_env(),
        )
        assert proc.stdin is not None and proc.stdout is not None
        _write(proc.stdin, pickle.dumps(self.settings))
        os.set_blocking(proc.stdin.fileno(), False)
        os.set_blocking(proc.stdout.fileno(), False)
        try:
            with anyio.fail_after(_START_TIMEOUT_S):
                ready = await _receive(proc.stdout.fileno())
        except (TimeoutError, OSError, EOFError) as exc:
            self._kill()
            raise CheckFailed(f"the definition checker did not start: {exc!r}") from None
        if pickle.loads(ready) != ("ready",):
            self._kill()
            raise CheckFailed("the definition checker did not start")
        return proc

    def _kill(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            for pipe in (self._proc.stdin, self._proc.stdout):
                if pipe is not None:
                    pipe.close()
            self._proc = None

    def close(self) -> None:
        self._kill()


_CHECKERS: dict[tuple[Settings, float, int], DefinitionChecker] = {}
_CHECKERS_LOCK = threading.Lock()


def checker_for(settings: Settings, timeout_s: float = 10.0) -> DefinitionChecker:
    """This thread's checker for these settings (its child starts on first use)."""
    key = (settings, timeout_s, threading.get_ident())
    with _CHECKERS_LOCK:
        found = _CHECKERS.get(key)
        if found is None:
            found = _CHECKERS[key] = DefinitionChecker(settings, timeout_s)
        return found


@atexit.register
def _close_all() -> None:
    for checker in _CHECKERS.values():
        checker.close()


def _write(pipe: IO[bytes], payload: bytes) -> None:
    pipe.write(_HEADER.pack(len(payload)) + payload)
    pipe.flush()


def _read(pipe: IO[bytes]) -> bytes:
    """One message from a blocking pipe (the child's end)."""
    head = _read_exactly(pipe, _HEADER.size)
    (size,) = _HEADER.unpack(head)
    return _read_exactly(pipe, size)


def _read_exactly(pipe: IO[bytes], size: int) -> bytes:
    chunks: list[bytes] = []
    while size:
        chunk = pipe.read(size)
        if not chunk:
            raise EOFError("the checker's pipe closed")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


async def _send(fd: int, payload: bytes) -> None:
    """One message to a non-blocking pipe (the parent's end), waiting on the event loop."""
    data = memoryview(_HEADER.pack(len(payload)) + payload)
    while data:
        try:
            written = os.write(fd, data)
        except BlockingIOError:
            await anyio.wait_writable(fd)
            continue
        data = data[written:]


async def _receive(fd: int) -> bytes:
    head = await _receive_exactly(fd, _HEADER.size)
    (size,) = _HEADER.unpack(head)
    return await _receive_exactly(fd, size)


async def _receive_exactly(fd: int, size: int) -> bytes:
    chunks: list[bytes] = []
    while size:
        try:
            chunk = os.read(fd, min(size, 1 << 20))
        except BlockingIOError:
            await anyio.wait_readable(fd)
            continue
        if not chunk:
            raise EOFError("the checker's pipe closed")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


# -- the child process ---------------------------------------------------------------------


def _serve(settings: Settings, requests: IO[bytes], replies: IO[bytes]) -> None:
    from treadle.runtime.daemon.definitions import summarize
    from treadle.runtime.execution.runtime import validate_inputs

    loader = DefinitionLoader(
        ImportAllowList(settings.allow_imports, settings.allow_backends),
        models=settings.models,
        max_bytes=settings.max_bytes,
    )
    compiled: OrderedDict[str, CompiledGraph] = OrderedDict()
    _write(replies, pickle.dumps(("ready",)))  # everything is imported: time requests now

    def keep(digest: str, cg: CompiledGraph) -> None:
        compiled[digest] = cg
        compiled.move_to_end(digest)
        while len(compiled) > _CACHE_SIZE:
            compiled.popitem(last=False)

    def answer(message: tuple[Any, ...]) -> tuple[Any, ...]:
        if message[0] == "check":
            _, text, fmt, filename = message
            try:
                cg = loader.prepare(text, fmt, filename)
            except DefinitionError as exc:
                return ("refused", str(exc))
            keep(definition_digest(text, fmt), cg)
            return ("ok", summarize(cg))
        op, digest, text, fmt, *args = message
        found = compiled.get(digest)
        if found is None:
            if text is None:
                return ("need",)
            try:
                found = loader.load_stored(text, fmt, digest)
            except ProgramError as exc:
                return ("refused", str(exc))
            keep(digest, found)
        cg = found
        if op == "outline":
            return ("ok", outline_of(cg.spec))
        if op == "answer":
            node, value = args
            try:
                return ("ok", answer_value(cg, node, value))
            except InputRejected as exc:
                return ("rejected", str(exc))
        (inputs,) = args
        try:
            validated = validate_inputs(cg, inputs)
        except InvalidInputs as exc:
            return ("invalid", str(exc))
        return ("ok", cg.name, validated.model_dump(mode="json"))

    while True:
        try:
            message = pickle.loads(_read(requests))
        except EOFError:
            return  # the parent closed the pipe: done
        try:
            reply = answer(message)
        except Exception as exc:  # a bug; the parent reports it instead of waiting
            log.exception("the definition checker failed on a request")
            reply = ("refused", f"cannot check the definition: {type(exc).__name__}: {exc}")
        _write(replies, pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL))


def main() -> None:
    requests, replies = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # anything a definition's imports print must not corrupt replies
    settings: Settings = pickle.loads(_read(requests))
    _serve(settings, requests, replies)


if __name__ == "__main__":
    main()
