"""Finding a program by name: a workflow file (`.yaml`, `.yml`, `.json`) or a Python object
(`path/to/file.py:attr`, `package.module:attr`; the attribute defaults to `graph`) that is a
`Graph`, a `GraphSpec`, or a function returning one."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from treadle.errors import GraphError
from treadle.graphs.builder import Graph
from treadle.graphs.spec import GraphSpec

WORKFLOW_SUFFIXES = (".yaml", ".yml", ".json")


class ProgramNotFound(GraphError, ValueError):
    """The program reference does not name a workflow file or a graph object, or its
    module cannot be imported (the message says where and why, on one line)."""


def load_program(ref: str) -> GraphSpec:
    path = Path(ref)
    if path.suffix.lower() in WORKFLOW_SUFFIXES:
        if not path.exists():
            raise ProgramNotFound(f"{ref}: no such workflow file")
        from treadle.graphs.files.loader import load_workflow

        return load_workflow(path)
    target, _, attr = ref.partition(":")
    attr = attr or "graph"
    if target.endswith(".py"):
        module = _import_file(Path(target))
    else:
        try:
            module = importlib.import_module(target)
        except Exception as exc:  # the module's own code failed: say where, not how deep
            raise ProgramNotFound(
                f"{_where(exc, None) or ref + ':'} cannot import {target!r}: {_error(exc)}"
            ) from None
    try:
        obj: Any = getattr(module, attr)
    except AttributeError:
        raise ProgramNotFound(f"{ref}: {target!r} has no attribute {attr!r}") from None
    if callable(obj) and not isinstance(obj, Graph | GraphSpec):
        obj = obj()
    if isinstance(obj, Graph):
        return obj.spec
    if isinstance(obj, GraphSpec):
        return obj
    raise ProgramNotFound(f"{ref}: {attr!r} is a {type(obj).__name__}, not a Graph")


def _import_file(path: Path) -> Any:
    if not path.exists():
        raise ProgramNotFound(f"{path}: no such file")
    name = f"treadle_program_{abs(hash(path.resolve()))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ProgramNotFound(f"{path}: cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        where = _where(exc, path) or f"{path}:"
        raise ProgramNotFound(f"{where} the program failed to import: {_error(exc)}") from None
    return module


def _error(exc: Exception) -> str:
    text = exc.msg if isinstance(exc, SyntaxError) else str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _where(exc: Exception, path: Path | None) -> str | None:
    """`FILE:LINE:` (with `COL:` for a syntax error) where an import failed: the deepest
    frame in `path` (any file when None), as editors and CI annotators read it."""
    if isinstance(exc, SyntaxError) and exc.filename and exc.lineno:
        col = f"{exc.offset}:" if exc.offset else ""
        return f"{exc.filename}:{exc.lineno}:{col}"
    found: str | None = None
    tb = exc.__traceback__
    resolved = path.resolve() if path is not None else None
    while tb is not None:
        frame_file = tb.tb_frame.f_code.co_filename
        mine = resolved is None or Path(frame_file).resolve() == resolved
        if mine and not frame_file.startswith("<"):
            shown = str(path) if path is not None else frame_file
            found = f"{shown}:{tb.tb_lineno}:"
        tb = tb.tb_next
    return found
