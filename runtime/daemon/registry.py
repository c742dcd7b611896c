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
Parsing and compiling are CPU work, so they run in a worker thread, and compiled graphs are
cached by digest (in the API for input validation, in workers for execution).
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import logging
import re
import tempfile
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import anyio
import anyio.to_thread
from pydantic import BaseModel
from redis.asyncio import Redis
from redis.exceptions import WatchError

from treadle.backends.factory import model_entry_problems
from treadle.errors import DaemonError
from treadle.graphs.compile import CompiledGraph, GraphValidationError, compile_graph
from treadle.graphs.files.loader import WorkflowFileError, load_workflow_text
from treadle.graphs.typecheck import describe
from treadle.runtime.core.store import RunRecord
from treadle.runtime.daemon.import_allowlist import AllowListViolation, ImportAllowList
from treadle.runtime.daemon.keys import DaemonKeys
from treadle.runtime.daemon.worker import ProgramError

log = logging.getLogger(__name__)

SOURCE_PREFIX = "registry:"
#: how long a name -> definition lookup is reused (see `WorkflowRegistry.get`)
NAME_CACHE_S = 1.0
_NAME_CACHE_MAX = 10_000
NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,99}$")
Format = Literal["yaml", "json"]


class DefinitionError(DaemonError, ValueError):
    """The definition cannot be registered; the message says where and why."""


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
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.allowlist = allowlist
        self.models = tuple(models)
        self.max_bytes = max_bytes
        self._cache: OrderedDict[str, CompiledGraph] = OrderedDict()
        self._names: dict[tuple[str, str], tuple[float, WorkflowInfo | None]] = {}
        self._cache_size = cache_size
        self._base_dir = _empty_dir()

    # -- validation --------------------------------------------------------------------

    def prepare(self, text: str, fmt: Format, filename: str) -> CompiledGraph:
        """Check and compile a definition (CPU work: call it in a thread)."""
        if len(text.encode("utf-8", "surrogatepass")) > self.max_bytes:
            raise DefinitionError(
                f"{filename}: the definition is larger than {self.max_bytes} bytes"
            )
        try:
            cg = self._load(text, fmt, filename)
        except (AllowListViolation, WorkflowFileError, GraphValidationError) as exc:
            raise DefinitionError(str(exc)) from None
        except RecursionError:
            raise DefinitionError(f"{filename}: the definition is nested too deeply") from None
        except Exception as exc:
            # a loader or compiler bug on odd input is still the definition's 422, not a 500
            log.exception("unexpected error while loading a definition")
            raise DefinitionError(
                f"{filename}: cannot load the definition: {type(exc).__name__}: {exc}"
            ) from None
        if not NAME.fullmatch(cg.name):
            raise DefinitionError(
                f"{filename}: name {cg.name!r}: a registered workflow's name must be 1-100 "
                "letters, digits, '_', '.' or '-', starting with a letter, digit or '_'"
            )
        return cg

    # -- registering and reading -------------------------------------------------------

    async def register(
        self, tenant: str, text: str, fmt: Format, filename: str | None = None
    ) -> WorkflowInfo:
        name = filename or f"<definition>.{fmt}"
        cg = await anyio.to_thread.run_sync(self.prepare, text, fmt, name)
        digest = definition_digest(text, fmt)
        self._remember(digest, cg)
        await self.redis.hset(self.keys.definition(digest), mapping={"format": fmt, "text": text})
        key = self.keys.workflows(tenant)
        while True:
            async with self.redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(key)
                    raw = await pipe.hget(key, cg.name)
                    old = WorkflowInfo.model_validate_json(raw) if raw is not None else None
                    info = _info(cg, digest, fmt, old)
                    pipe.multi()
                    pipe.hset(key, cg.name, info.model_dump_json())
                    # the version's own record: written once (a version never changes)
                    versions = self.keys.workflow_versions(tenant, cg.name)
                    pipe.hsetnx(versions, str(info.version), info.model_dump_json())
                    await pipe.execute()
                    self._names[(tenant, cg.name)] = (time.monotonic() + NAME_CACHE_S, info)
                    return info
                except WatchError:
                    continue  # registered concurrently: read the new version and go again

    async def get(self, tenant: str, name: str) -> WorkflowInfo | None:
        """The tenant's current definition of `name`. Answers are cached for
        `NAME_CACHE_S` (submitting looks the name up on every run); a registration through
        this process updates the cache at once, one through another process is seen within
        that time."""
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
        raw = await self.redis.hgetall(self.keys.workflow_versions(tenant, name))
        found = sorted((WorkflowInfo.model_validate_json(v) for v in raw.values()), key=_by_version)
        if not found:  # registered before versions were kept: its latest is all there is
            latest = await self.get(tenant, name)
            found = [latest] if latest is not None else []
        return found

    async def version(self, tenant: str, name: str, version: int) -> WorkflowInfo | None:
        """Version `version` of the tenant's workflow `name` (None: no such version)."""
        raw = await self.redis.hget(self.keys.workflow_versions(tenant, name), str(version))
        if raw is not None:
            return WorkflowInfo.model_validate_json(raw)
        latest = await self.get(tenant, name)
        return latest if latest is not None and latest.version == version else None

    async def list_workflows(self, tenant: str) -> list[WorkflowInfo]:
        raw = await self.redis.hgetall(self.keys.workflows(tenant))
        return sorted((WorkflowInfo.model_validate_json(v) for v in raw.values()), key=_by_name)

    async def definition(self, digest: str) -> tuple[Format, str] | None:
        found: Any = await self.redis.hmget(self.keys.definition(digest), ["format", "text"])
        fmt, text = found
        if fmt is None or text is None:
            return None
        return ("json" if fmt == b"json" else "yaml"), text.decode("utf-8")

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
        try:
            cg = await anyio.to_thread.run_sync(self._compile_stored, text, fmt, digest)
        except (WorkflowFileError, GraphValidationError) as exc:
            # it was valid when registered: the installed code changed since
            raise ProgramError(str(exc)) from None
        self._remember(digest, cg)
        return cg

    def _compile_stored(self, text: str, fmt: Format, digest: str) -> CompiledGraph:
        try:
            # checked again before loading, so that a definition stored before the allow-list
            # changed (or written to Redis directly) cannot import a refused module
            return self._load(text, fmt, f"{digest[:12]}.{fmt}")
        except AllowListViolation as exc:
            raise ProgramError(f"refused by the import allow-list: {exc}") from None

    def _load(self, text: str, fmt: Format, filename: str) -> CompiledGraph:
        """The import allow-list on the document, the loader, the allow-list on the loaded spec,
        then the compiler (CPU work)."""
        self.allowlist.check_document(text, filename=filename, fmt=fmt)
        spec = load_workflow_text(text, filename=filename, base_dir=self._base_dir, fmt=fmt)
        self.allowlist.check_spec(spec)
        return compile_graph(spec, models=self.models, check_model=model_entry_problems)

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


@functools.cache
def _empty_dir() -> Path:
    """Where a definition's relative subgraph paths and local modules would be looked up:
    an empty folder of this process (the allow-list refuses subgraph files anyway)."""
    folder = tempfile.TemporaryDirectory(prefix="treadle-defs-")
    atexit.register(folder.cleanup)
    return Path(folder.name)


def definition_digest(text: str, fmt: str) -> str:
    return hashlib.sha256(f"{fmt}\0{text}".encode("utf-8", "surrogatepass")).hexdigest()


def source_of(digest: str) -> str:
    return SOURCE_PREFIX + digest


def _by_name(info: WorkflowInfo) -> str:
    return info.name


def _by_version(info: WorkflowInfo) -> int:
    return info.version


def _info(cg: CompiledGraph, digest: str, fmt: Format, old: WorkflowInfo | None) -> WorkflowInfo:
    now = time.time()
    if old is None:
        version, created = 1, now
    else:
        version = old.version if old.digest == digest else old.version + 1
        created = old.created_at
    try:
        schema: dict[str, Any] | None = cg.input_model.model_json_schema()
    except Exception:  # a type pydantic cannot describe: the schema is only informative
        schema = None
    inputs = {
        name: InputInfo(type=describe(decl.type), required=decl.required)
        for name, decl in cg.spec.inputs.items()
    }
    return WorkflowInfo(
        name=cg.name,
        digest=digest,
        version=version,
        format=fmt,
        description=cg.spec.description,
        inputs=inputs,
        input_schema=schema,
        nodes=[n.id for n in cg.spec.nodes],
        created_at=created,
        updated_at=now,
    )
