"""Approval before a risky tool: a model proposes which files to delete to free disk
space, a person approves or refuses (the run waits for them, durably, holding nothing),
and only an approved plan reaches the tool that deletes.

    treadle run examples/approval.yaml                 # waits for the approval (exit 3)
    treadle resume RUN_ID --input '{"approved": true, "comment": "go ahead"}'

The workspace is a scratch folder of its own (`workspace` makes one when none is given),
so the example never touches anything else.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from pydantic import BaseModel

from treadle import Graph, InputSpec, first_of, tool

SYSTEM = "You keep build machines tidy. Never delete sources."

#: the embedded default model: a deterministic plan, so the example runs offline
MODELS = {
    "default": {
        "backend": "scripted",
        "rules": [
            {
                "match": "Choose the files to delete",
                "content": '{"paths": ["build/app.o", "build/app.bin", "logs/old.log"], '
                '"reason": "build outputs and an old log; sources stay"}',
            }
        ],
    }
}

#: what a fresh workspace holds
FILES = {
    "src/app.c": "int main(void) { return 0; }\n",
    "build/app.o": "\x7fELF object",
    "build/app.bin": "\x7fELF binary",
    "logs/old.log": "2026-01-01 started\n",
}


class Listing(BaseModel):
    root: str
    files: list[str]


class Cleanup(BaseModel):
    paths: list[str]
    reason: str


class Approval(BaseModel):
    approved: bool
    comment: str = ""


def workspace(path: str) -> Listing:
    """The folder to tidy (a fresh scratch folder with a few files when `path` is empty)."""
    root = Path(path) if path else Path(tempfile.mkdtemp(prefix="treadle-approval-"))
    if not path:
        for name, text in FILES.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(text)
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    return Listing(root=str(root), files=files)


@tool(expected_duration_s=0.01, timeout_s=10, idempotent=False)
def delete_files(root: str, paths: list[str]) -> list[str]:
    """Delete files under a folder (the risky step: it cannot be undone).

    Args:
        root: The folder the paths are relative to.
        paths: Files to delete.
    """
    base = Path(root).resolve()
    deleted = []
    for rel in paths:
        target = (base / rel).resolve()
        if base not in target.parents or not target.is_file():
            continue  # outside the folder, or gone already: never followed
        target.unlink()
        deleted.append(rel)
    return deleted


def kept(approval: Approval) -> list[str]:
    """Nothing deleted: the person said no."""
    return []


def build() -> Graph:
    g = Graph(
        "approval",
        inputs={"workspace": InputSpec(str, "")},
        description="Propose a cleanup, ask a person, delete only what they approved.",
        models=MODELS,
    )
    listing = g.func("list", workspace, inputs={"path": g.input.workspace})
    plan = g.llm(
        "plan",
        "Choose the files to delete to free space in {root}:\n{files}",
        system=SYSTEM,
        output=Cleanup,
        inputs={"root": listing.out.root, "files": listing.out.files},
    )
    approve = g.ask(
        "approve",
        "Delete {paths} from {root}? ({reason})",
        output=Approval,
        inputs={"paths": plan.out.paths, "root": listing.out.root, "reason": plan.out.reason},
    )
    g.branch(
        "decide",
        {"true": ["delete"], "false": ["keep"]},
        inputs={"approved": approve.out.approved},
    )
    delete = g.tool(
        "delete", delete_files, inputs={"root": listing.out.root, "paths": plan.out.paths}
    )
    keep = g.func("keep", kept, inputs={"approval": approve})
    g.output(deleted=first_of(delete.out, keep.out), approval=approve)
    return g


graph = build()
