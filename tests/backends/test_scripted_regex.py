"""Scripted rules match with RE2, in time linear in the text: a tenant's rule cannot freeze
the process that runs it (issue 13, finding 1: `(a+)+$` on 28 a's and a b stalled a shared
event loop for minutes under Python's backtracking `re`)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from treadle.backends.base import LLMRequest, Message
from treadle.backends.factory import create_backend
from treadle.backends.scripted import ScriptedBackend, ScriptRule

pytestmark = pytest.mark.anyio

CATASTROPHIC = r"(a+)+$"

PROBE = f"""
import anyio
from treadle.backends.base import LLMRequest, Message
from treadle.backends.scripted import ScriptedBackend, ScriptRule

backend = ScriptedBackend([ScriptRule(match={CATASTROPHIC!r}, content="matched")])
request = LLMRequest(model="m", messages=[Message(role="user", content="a" * 40 + "b")])
print(anyio.run(backend.generate, request).content)
"""


def test_a_catastrophic_pattern_answers_at_once() -> None:
    # in a child process: Python's `re` would hold the GIL (and this test) for hours; the
    # generous limit is a hang detector, not a timing assertion
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Answer (")  # no match: the generated answer


async def test_rules_keep_their_meaning() -> None:
    rule = ScriptRule(
        match=r"Incident: ([^\n]+).*?Fix: (.+?)\.", content="{groups[1]} / {groups[2]}"
    )
    backend = ScriptedBackend([rule])
    text = "Incident: disk full\nlots\nof\nlines\nFix: rotate logs. Later: more."
    request = LLMRequest(model="m", messages=[Message(role="user", content=text)])
    assert (await backend.generate(request)).content == "disk full / rotate logs"


@pytest.mark.parametrize("pattern", [r"(a)\1", r"(?<=a)b", r"(?=x)"])
def test_patterns_re2_cannot_run_in_linear_time_are_refused_where_they_are_written(
    pattern: str,
) -> None:
    with pytest.raises(ValueError, match="RE2"):
        ScriptRule(match=pattern)
    with pytest.raises(ValueError, match=r"rules\.0\.match.*RE2"):
        create_backend({"backend": "scripted", "rules": [{"match": pattern, "content": "x"}]})
