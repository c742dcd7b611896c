"""One error root: every exception class treadle defines derives from `TreadleError` and
sits in its documented sub-tree; `RunStatus` names every status a run can reach."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import tomllib
from pathlib import Path
from types import ModuleType
from typing import get_args

import anyio
import pytest

import treadle
from treadle import errors
from treadle.errors import (
    BackendError,
    DaemonError,
    GatewayError,
    GraphError,
    RunError,
    SetupError,
    StoreError,
    ToolError,
    TreadleError,
)
from treadle.runtime.core.store import TERMINAL, RunStatus

REPO = Path(__file__).resolve().parents[1]

#: exception classes that deliberately do not derive from `TreadleError`, and why
NOT_ERRORS = {
    # signals, not errors: raised inside the simulated clock's callbacks to stop a
    # simulation early and caught a few lines up; under the root, an `except TreadleError`
    # in the engine between raise and catch would swallow them
    "treadle.benchmarks.dispatch._SloBroken",
    "treadle.benchmarks.dispatch._AllStarted",
    # a signal, not an error: an `ask` node without an answer raises it, and the scopes
    # above pass it up to the runtime, which parks the run (status `waiting`); under the
    # root, an `except TreadleError` on the way would take a wait for a failure
    "treadle.runtime.core.waiting.InputPending",
}

#: where each public exception belongs (the tree in `treadle.errors`' docstring)
SUBTREE = {
    "GraphValidationError": GraphError,
    "WorkflowFileError": GraphError,
    "TypeRefError": GraphError,
    "ImportPathError": GraphError,
    "ProgramNotFound": GraphError,
    "InvalidInputs": RunError,
    "InvalidModel": RunError,
    "RunFailed": RunError,
    "RunCancelled": RunError,
    "NodeError": RunError,
    "OutputError": RunError,
    "NodeTimeout": RunError,
    "InputRejected": RunError,
    "InputConflict": RunError,
    "ArgumentResolutionError": RunError,
    "NoReplicaAvailable": BackendError,
    "MetricsFormatError": BackendError,
    "SimulatorFailure": BackendError,
    "DuplicateRequestId": BackendError,
    "ContextLengthExceeded": BackendError,
    "OutOfBlocks": BackendError,
    "ToolArgumentError": ToolError,
    "ToolTimeout": ToolError,
    "CalculatorError": ToolError,
    "RunNotFound": StoreError,
    "JournalError": StoreError,
    "LeaseLost": StoreError,
    "ApiError": DaemonError,
    "NotFound": DaemonError,
    "Conflict": DaemonError,
    "InvalidRequest": DaemonError,
    "DefinitionError": DaemonError,
    "CheckFailed": DaemonError,
    "AllowListViolation": DaemonError,
    "TenantError": DaemonError,
    "QuotaExceeded": DaemonError,
    "ProgramError": DaemonError,
    "RunInterrupted": DaemonError,
    "LoginRequired": DaemonError,
    "ClientError": DaemonError,
    "GatewayConfigError": GatewayError,
    "HintError": GatewayError,
    "CallWithdrawn": GatewayError,
    "TracingUnavailable": SetupError,
    "MetricsUnavailable": SetupError,
    "RedisUnavailable": SetupError,
    "LlamaServerUnavailable": SetupError,
}


def _all_modules() -> list[ModuleType]:
    """Every module of the installed package: the packages pyproject lists (the top-level
    folders are mapped into `treadle.*`, so walking `treadle.__path__` alone misses them)."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    modules: dict[str, ModuleType] = {}
    for package_name in config["tool"]["setuptools"]["packages"]:
        package = importlib.import_module(package_name)
        modules[package_name] = package
        for info in pkgutil.iter_modules(package.__path__, package_name + "."):
            if info.ispkg or info.name.endswith(".__main__"):
                continue  # sub-packages are listed themselves; __main__ runs the CLI
            modules[info.name] = importlib.import_module(info.name)
    return list(modules.values())


def _defined_exceptions() -> dict[str, type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for module in _all_modules():
        for obj in vars(module).values():
            if (
                inspect.isclass(obj)
                and issubclass(obj, BaseException)
                and obj.__module__ == module.__name__
            ):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return found


def test_every_exception_class_derives_from_the_root() -> None:
    found = _defined_exceptions()
    assert len(found) > 40  # the walk reached the mapped folders, not only treadle/
    outside = sorted(
        name
        for name, cls in found.items()
        if not issubclass(cls, TreadleError) and name not in NOT_ERRORS
    )
    assert outside == [], f"exceptions outside the tree: {outside}"
    stale = sorted(NOT_ERRORS - set(found))
    assert stale == [], f"NOT_ERRORS names classes that no longer exist: {stale}"


def test_each_public_exception_is_in_its_documented_subtree() -> None:
    found = {cls.__name__: cls for name, cls in _defined_exceptions().items()}
    for name, base in SUBTREE.items():
        assert name in found, f"{name} is gone: update SUBTREE and treadle.errors' docstring"
        assert issubclass(found[name], base), f"{name} is not a {base.__name__}"
        assert name in (errors.__doc__ or ""), f"{name} is missing from the documented tree"
    public = {
        name
        for name, cls in found.items()
        if not name.startswith("_")
        and issubclass(cls, TreadleError)
        and cls.__module__ != "treadle.errors"
    }
    assert public <= set(SUBTREE), f"place these in SUBTREE and the docs: {public - set(SUBTREE)}"


def test_the_root_and_bases_are_exported_from_the_face() -> None:
    for name in errors.__all__:
        assert getattr(treadle, name) is getattr(errors, name)
        assert name in treadle.__all__


def test_builtin_bases_are_kept_for_older_except_clauses() -> None:
    from treadle.graphs.files.loader import WorkflowFileError
    from treadle.runtime.core.store import RunNotFound
    from treadle.tools.calc import CalculatorError, evaluate

    assert issubclass(WorkflowFileError, ValueError)
    assert issubclass(RunNotFound, KeyError)
    with pytest.raises(ValueError) as info:
        evaluate("1 / 0")
    assert isinstance(info.value, CalculatorError) and isinstance(info.value, ToolError)
    assert info.value.tool == "calculator" and info.value.reason == "division by zero"


@pytest.mark.anyio
async def test_a_failed_run_raises_one_run_failed_naming_the_node() -> None:
    def explode(x: int) -> int:
        raise ValueError("bad value")

    g = treadle.Graph("boom", inputs={"x": int})
    g.output(out=g.func("explode", explode, inputs={"x": g.input.x}, blocking=True).out)
    with pytest.raises(treadle.RunFailed) as info:
        await treadle.Runtime().run(g, {"x": 1})
    assert isinstance(info.value, RunError) and isinstance(info.value, TreadleError)
    assert info.value.error == "node 'explode' failed: ValueError: bad value"


@pytest.mark.anyio
async def test_run_status_names_every_status_a_run_reaches() -> None:
    """Statuses come from `RunResult` and the stores: a run cancelled from outside (not by
    its handle) is "interrupted", and a store accepts that status."""
    assert set(TERMINAL) < set(get_args(RunStatus))

    async def wait(x: int) -> int:
        await anyio.sleep(30)
        return x

    g = treadle.Graph("slow", inputs={"x": int})
    g.output(out=g.func("wait", wait, inputs={"x": g.input.x}).out)
    runtime = treadle.Runtime()
    handle: treadle.RunHandle | None = None
    with anyio.CancelScope() as outer:
        async with runtime.start(g, {"x": 1}) as handle:
            async for event in handle.events():
                if event.kind == "node_started":
                    outer.cancel()
    assert handle is not None
    result = await handle.result()
    assert result.status == "interrupted"
    assert result.status in get_args(RunStatus)
    await runtime.store.update_run(result.run_id, status=result.status)
    record = await runtime.store.get_run(result.run_id)
    assert record is not None and record.status == "interrupted"
