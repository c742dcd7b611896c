"""Functions and types that the control-flow sample workflows name by import path (the
loader finds this module through the workflow file's folder)."""

from __future__ import annotations

from pydantic import BaseModel

from treadle.graphs.spec import ErrorInfo


class Approval(BaseModel):
    approved: bool
    note: str = ""


class Attempt(BaseModel):
    code: str
    passed: bool
    tries: int


def attempt(code: str, tries: int) -> Attempt:
    return Attempt(code=code + "+", passed=tries + 1 >= 2, tries=tries + 1)


def recover(error: ErrorInfo) -> str:
    return f"recovered from {error.type}"


def boom(x: str) -> str:
    raise RuntimeError("boom " + x)


def label(name: str, i: int) -> str:
    return f"{i}:{name}"


def still_failing(out: Attempt) -> bool:
    return not out.passed
