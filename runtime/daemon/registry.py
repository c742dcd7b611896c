"""The workflow registry: tenants' named, versioned workflow definitions, stored in Redis.

A definition is stored once by content (`treadle:wfdef:<sha256>`). Registering a name with
a definition that differs from its latest makes a new version (1, 2, ...): each version's
info is written once and never changed (`treadle:tenant:<t>:wfversions:<name>`), and the
name points at the latest (`treadle:tenant:<t>:workflows`); registering the latest
definition again changes nothing. A run records its version
(`RunRecord.meta["workflow_version"]`) and its program by content (`RunRecord.source` is
`registry:<digest>`), so registering a workflow again never changes the program under a
run that is queued, waiting or being resumed. A run is submitted on the latest version or
on one it names.

Workers check the import allow-list again when they load a stored definition (defense in
depth: `ProgramError`, and the run fails). Registering validates the definition completely
before storing it: the import allow-list (`ImportAllowList`, before and after loading), the
loader (`WorkflowFileError`: file:line:col), and graph validation (`GraphValidationError`).
Parsing and compiling are CPU work a tenant controls: with a `DefinitionChecker` (the API's)
they run in its child process, which also validates each new run's inputs, so none of it
runs in the API's process; without one they run in a worker thread. Workers compile the
definitions they execute themselves (cached by digest).
"""

from __future__ import annotations

import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import anyio
import anyio.to_thread
from pydantic import BaseModel
from redis.asyncio import Redis
from redis.exceptions import WatchError

from treadle.graphs.compile import CompiledGraph
from treadle.graphs.outline import GraphOutline, outline_of
from treadle.runtime.core.store import RunRecord
from treadle.runtime.daemon.checker import DefinitionChecker
from treadle.runtime.daemon.definitions import (
    NAME,
    DefinitionLoader,
    Format,
    Summary,
    definition_digest,
    summarize,
)
from treadle.runtime.daemon.definitions import (
    DefinitionError as DefinitionError,  # (where callers have always found it)
)
from treadle.runtime.daemon.import_allowlist import ImportAllowList
from treadle.runtime.daemon.keys import DaemonKeys
from treadle.runtime.daemon.worker import ProgramError
from treadle.runtime.execution.inputs import answer_value
from treadle.runtime.execution.runtime import validate_inputs

log = logging.getLogger(__name__)

SOURCE_PREFIX = "registry:"
#: how long a name -> definition lookup is reused (see `WorkflowRegistry.get`)
NAME_CACHE_S = 1.0
_NAME_CACHE_MAX = 10_000


class InputInfo(BaseModel):
    type: str
    required: bool


class WorkflowInfo(BaseModel):
    name: str
    digest: str
    version: int
    format: Format
    description: str = ""
    inputs: dict[str, InputInfo]
    input_schema: dict[str, Any] | None = None
    nodes: list[str]
    created_at: float
    updated_at: float


class WorkflowRegistry:
    def __init__(
        self,
        redis: Redis,
        keys: DaemonKeys,
        allowlist: ImportAllowList,
        *,
        models: Sequence[str] = (),
        max_bytes: int = 256 * 1024,
        cache_size: int = 256,
        checker: DefinitionChecker | None = None,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.allowlist = allowlist
        self.loader = DefinitionLoader(allowlist, models=models, max_bytes=max_bytes)
        self._cache: OrderedDict[str, CompiledGraph] = OrderedDict()
        self._outlines: OrderedDict[str, GraphOutline] = OrderedDict()
        self._names: dict[tuple[str, str], tuple[float, WorkflowInfo | None]] = {}
        self._cache_size = cache_size
        self.checker = checker

    # -- validation --------------------------------------------------------------------

    def prepare(self, text: str, fmt: Format, filename: str) -> CompiledGraph:
        """Check and compile a definition (CPU work: call it in a thread)."""
        return self.loader.prepare(text, fmt, filename)

    # -- registering and reading -------------------------------------------------------

    async def register(
        self, tenant: str, text: str, fmt: Format, filename: str | None = None
    ) -> WorkflowInfo:
        name = filename or f"<definition>.{fmt}"
        digest = definition_digest(text, fmt)
        if self.checker is not None:
            summary = await self.checker.check(text, fmt, name)
        else:
            cg = await anyio.to_thread.run_sync(self.prepare, text, fmt, name)
            self._remember(digest, cg)
            summary = summarize(cg)
        await self.redis.hset(self.keys.definition(digest), mapping={"format": fmt, "text": text})
        key = self.keys.workflows(tenant)
        while True:
            async with self.redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(key)
                    raw = await pipe.hget(key, summary.name)
                    old = WorkflowInfo.model_validate_json(raw) if raw is not None else None
                    info = _info(summary, digest, fmt, old)
                    pipe.multi()
                    pipe.hset(key, summary.name, info.model_dump_json())
                    # the version's own record: written once (a version never changes)
                    versions = self.keys.workflow_versions(tenant, summary.name)
                    pipe.hsetnx(versions, str(info.version), info.model_dump_json())
                    await pipe.execute()
                    self._names[(tenant, summary.name)] = (time.monotonic() + NAME_CACHE_S, info)
                    return info
                except WatchError:
                    continue  # registered concurrently: read the new version and go again

    async def get(self, tenant: str, name: str) -> WorkflowInfo | None:
        """The tenant's current definition of `name`. Answers are cached for
        `NAME_CACHE_S` (submitting looks the name up on every run); a registration through
        this process updates the cache at once, one through another process is seen within
        that time."""
        if not NAME.fullmatch(name):
            return None  # no registered workflow has such a name
        now = time.monotonic()
        hit = self._names.get((tenant, name))
        if hit is not None and hit[0] > now:
            return hit[1]
        raw = await self.redis.hget(self.keys.workflows(tenant), name)
        info = WorkflowInfo.model_validate_json(raw) if raw is not None else None
        if len(self._names) >= _NAME_CACHE_MAX:
            self._names.clear()
        self._names[(tenant, name)] = (now + NAME_CACHE_S, info)
        return info

    async def versions(self, tenant: str, name: str) -> list[WorkflowInfo]:
        """Every version of the tenant's workflow `name`, oldest first (empty: no such
        workflow)."""
        if not NAME.fullmatch(name):
            return []
        raw = await self.redis.hgetall(self.keys.workflow_versions(tenant, name))
        found = sorted((WorkflowInfo.model_validate_json(v) for v in raw.values()), key=_by_version)
        if not found:  # registered before versions were kept: its latest is all there is
            latest = await self.get(tenant, name)
            found = [latest] if latest is not None else []
        return found

    async def version(self, tenant: str, name: str, version: int) -> WorkflowInfo | None:
        """Version `version` of the tenant's workflow `name` (None: no such version)."""
        if not NAME.fullmatch(name):
            return None
        raw = await self.redis.hget(self.keys.workflow_versions(tenant, name), str(version))
        if raw is not None:
            return WorkflowInfo.model_validate_json(raw)
        latest = await self.get(tenant, name)
        return latest if latest is not None and latest.version == version else None

    async def list_workflows(self, tenant: str) -> list[WorkflowInfo]:
        raw = await self.redis.hgetall(self.keys.workflows(tenant))
        return sorted((WorkflowInfo.model_validate_json(v) for v in raw.values()), key=_by_name)

    async def definition(self, digest: str) -> tuple[Format, str] | None:
        """The stored definition's (format, text), or None."""
        found: Any = await self.redis.hmget(self.keys.definition(digest), ["format", "text"])
        fmt, text = found
        if fmt is None or text is None:
            return None
        return ("json" if fmt == b"json" else "yaml"), text.decode("utf-8")

    async def outline(self, digest: str) -> GraphOutline:
        """The stored definition's graph as declared, for drawing (cached; loaded by the
        checker's process when there is one); `ProgramError` if unknown or unloadable."""
        found = self._outlines.get(digest)
        if found is not None:
            self._outlines.move_to_end(digest)
            return found
        if self.checker is not None:
            load = functools.partial(self.definition, digest)
            found = await self.checker.outline(digest, load)
        else:
            found = outline_of((await self.compiled(digest)).spec)
        self._outlines[digest] = found
        while len(self._outlines) > self._cache_size:
            self._outlines.popitem(last=False)
        return found

    async def check_answer(self, digest: str, node: str, value: Any) -> Any:
        """An answer to the request of the `ask` instance `node` of a run of `digest`, as
        the run keeps it (`InputRejected` when it does not fit; `ProgramError` as `spec`)."""
        if self.checker is not None:
            load = functools.partial(self.definition, digest)
            return await self.checker.answer(digest, load, node, value)
        return answer_value(await self.compiled(digest), node, value)

    async def validate_inputs(
        self, digest: str, inputs: Mapping[str, Any]
    ) -> tuple[str, dict[str, Any]]:
        """(graph name, the inputs validated as the run's record keeps them) for a run of the
        stored definition `digest`; `InvalidInputs` when they do not match its inputs."""
        if self.checker is not None:
            return await self.checker.validate(
                digest, inputs, functools.partial(self.definition, digest)
            )
        cg = await self.compiled(digest)
        return cg.name, validate_inputs(cg, inputs).model_dump(mode="json")

    async def compiled(self, digest: str) -> CompiledGraph:
        """The compiled graph of a stored definition (cached); `ProgramError` if unknown."""
        cg = self._cache.get(digest)
        if cg is not None:
            self._cache.move_to_end(digest)
            return cg
        found = await self.definition(digest)
        if found is None:
            raise ProgramError(f"no workflow definition with digest {digest}")
        fmt, text = found
        cg = await anyio.to_thread.run_sync(self.loader.load_stored, text, fmt, digest)
        self._remember(digest, cg)
        return cg

    def _remember(self, digest: str, cg: CompiledGraph) -> None:
        self._cache[digest] = cg
        self._cache.move_to_end(digest)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)


class RegistryLoader:
    """`ProgramLoader` for workers: a run's `source` is `registry:<digest>`."""

    def __init__(self, registry: WorkflowRegistry) -> None:
        self.registry = registry

    async def load(self, record: RunRecord) -> CompiledGraph:
        source = record.source or ""
        if not source.startswith(SOURCE_PREFIX):
            raise ProgramError(f"run source {source!r} is not a registered workflow definition")
        return await self.registry.compiled(source[len(SOURCE_PREFIX) :])


def source_of(digest: str) -> str:
    return SOURCE_PREFIX + digest


def _by_name(info: WorkflowInfo) -> str:
    return info.name


def _by_version(info: WorkflowInfo) -> int:
    return info.version


def _info(summary: Summary, digest: str, fmt: Format, old: WorkflowInfo | None) -> WorkflowInfo:
    now = time.time()
    if old is None:
        version, created = 1, now
    else:
        version = old.version if old.digest == digest else old.version + 1
        created = old.created_at
    return WorkflowInfo(
        name=summary.name,
        digest=digest,
        version=version,
        format=fmt,
        description=summary.description,
        inputs={
            name: InputInfo(type=kind, required=required)
            for name, (kind, required) in summary.inputs.items()
        },
        input_schema=summary.input_schema,
        nodes=summary.nodes,
        created_at=created,
        updated_at=now,
    )
