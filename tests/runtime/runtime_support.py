"""Helpers of the runtime tests (their fixtures are in this folder's conftest.py)."""

from __future__ import annotations

from collections.abc import Callable

from treadle.runtime.core.store import StateStore

#: opens a store on the test's data (the same data every time, except for `memory`)
StoreFactory = Callable[[], StateStore]
