"""Which executor runs which node kind: `executor_for(spec)`.

Every kind of `treadle.graphs.kinds.KINDS` must have its executor in the module of this
package named after it (`treadle.runtime.nodes.llm` for `llm`), as `EXECUTOR`. The
registry is built when this module is imported, so a kind without an executor fails every
program (and test) that can run a node, with a message that says what to write.
"""

from __future__ import annotations

import importlib
from typing import Any

from treadle.graphs.kinds import KINDS
from treadle.graphs.spec import NodeSpec
from treadle.runtime.nodes.base import NodeExecutor


def _load() -> dict[type[NodeSpec], NodeExecutor[Any]]:
    found: dict[type[NodeSpec], NodeExecutor[Any]] = {}
    for kind in KINDS:
        module_name = f"{__package__}.{kind.name}"
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            raise ImportError(
                f"node kind {kind.name!r} has no executor: write {module_name} with "
                f"EXECUTOR, a NodeExecutor for {kind.spec.__name__}"
            ) from None
        executor = getattr(module, "EXECUTOR", None)
        if not isinstance(executor, NodeExecutor) or executor.spec is not kind.spec:
            raise ImportError(
                f"{module_name}.EXECUTOR must be a NodeExecutor whose spec is "
                f"{kind.spec.__name__}, not {executor!r}"
            )
        found[kind.spec] = executor
    return found


EXECUTORS: dict[type[NodeSpec], NodeExecutor[Any]] = _load()


def executor_for(spec: NodeSpec) -> NodeExecutor[Any]:
    try:
        return EXECUTORS[type(spec)]
    except KeyError:
        raise TypeError(f"no executor for {type(spec).__name__} nodes") from None
