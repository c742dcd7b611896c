"""Loading a tenant's workflow definition: the checks and the compile, with no I/O.

`DefinitionLoader.prepare` checks a definition completely before it is registered: its
size and text, the import allow-list (`ImportAllowList`, before and after loading), the
loader (`WorkflowFileError`: file:line:col) and graph validation (`GraphValidationError`);
any of them is a `DefinitionError` saying where and why. `load_stored` loads one that was
registered, for a run (checking the allow-list again). The API's `DefinitionChecker` runs
these in its child process; workers run `load_stored` themselves.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import logging
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from treadle.backends.factory import model_entry_problems
from treadle.errors import DaemonError
from treadle.graphs.compile import CompiledGraph, GraphValidationError, compile_graph
from treadle.graphs.files.loader import WorkflowFileError, load_workflow_text
from treadle.graphs.typecheck import describe
from treadle.runtime.daemon.import_allowlist import AllowListViolation, ImportAllowList
from treadle.runtime.daemon.worker import ProgramError

log = logging.getLogger(__name__)

NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,99}$")
Format = Literal["yaml", "json"]


class DefinitionError(DaemonError, ValueError):
    """The definition cannot be registered; the message says where and why."""


class DefinitionLoader:
    def __init__(
        self, allowlist: ImportAllowList, *, models: Sequence[str] = (), max_bytes: int = 256 * 1024
    ) -> None:
        self.allowlist = allowlist
        self.models = tuple(models)
        self.max_bytes = max_bytes
        self._base_dir = _empty_dir()

    def prepare(self, text: str, fmt: Format, filename: str) -> CompiledGraph:
        """Check and compile a definition (CPU work)."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            line = text.count("\n", 0, exc.start) + 1
            raise DefinitionError(
                f"{filename}:{line}: the definition holds a lone surrogate "
                f"(\\u{ord(text[exc.start]):04x}), which is not Unicode text"
            ) from None
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

    def load_stored(self, text: str, fmt: Format, digest: str) -> CompiledGraph:
        """A registered definition, for its runs: `ProgramError` if it no longer loads."""
        try:
            # checked again before loading, so that a definition stored before the allow-list
            # changed (or written to Redis directly) cannot import a refused module
            return self._load(text, fmt, f"{digest[:12]}.{fmt}")
        except AllowListViolation as exc:
            raise ProgramError(f"refused by the import allow-list: {exc}") from None
        except (WorkflowFileError, GraphValidationError) as exc:
            # it was valid when registered: the installed code changed since
            raise ProgramError(str(exc)) from None

    def _load(self, text: str, fmt: Format, filename: str) -> CompiledGraph:
        """The import allow-list on the document, the loader, the allow-list on the loaded spec,
        then the compiler (CPU work)."""
        self.allowlist.check_document(text, filename=filename, fmt=fmt)
        spec = load_workflow_text(text, filename=filename, base_dir=self._base_dir, fmt=fmt)
        self.allowlist.check_spec(spec)
        return compile_graph(spec, models=self.models, check_model=model_entry_problems)


@dataclass(frozen=True)
class Summary:
    """What the registry records of a checked definition."""

    name: str
    description: str
    #: input name -> (type as written, required)
    inputs: dict[str, tuple[str, bool]]
    input_schema: dict[str, Any] | None
    nodes: list[str]


def summarize(cg: CompiledGraph) -> Summary:
    try:
        schema: dict[str, Any] | None = cg.input_model.model_json_schema()
    except Exception:  # a type pydantic cannot describe: the schema is only informative
        schema = None
    return Summary(
        name=cg.name,
        description=cg.spec.description,
        inputs={n: (describe(d.type), d.required) for n, d in cg.spec.inputs.items()},
        input_schema=schema,
        nodes=[n.id for n in cg.spec.nodes],
    )


def definition_digest(text: str, fmt: str) -> str:
    return hashlib.sha256(f"{fmt}\0{text}".encode("utf-8", "surrogatepass")).hexdigest()


@functools.cache
def _empty_dir() -> Path:
    """Where a definition's relative subgraph paths and local modules would be looked up:
    an empty folder of this process (the allow-list refuses subgraph files anyway)."""
    folder = tempfile.TemporaryDirectory(prefix="treadle-defs-")
    atexit.register(folder.cleanup)
    return Path(folder.name)
