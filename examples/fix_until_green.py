"""Fix until the tests pass: a model writes a function, the tests run, and while they
fail the model gets the failures and tries again — at most `max_iterations` times, each
attempt checkpointed (a resumed run repeats no finished attempt).

    treadle run examples/fix_until_green.yaml
    treadle run treadle.examples.fix_until_green:graph

The tests run in a separate Python process with a timeout, as generated code should.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from pydantic import BaseModel

from treadle import Graph, InputSpec, tool

#: the embedded default model: a first draft with a bug, then its fix, so the example
#: runs offline and shows the loop go round
MODELS = {
    "default": {
        "backend": "scripted",
        "rules": [
            {
                "match": "Tests so far: none",
                "content": '{"code": "def slugify(text):\\n    return text.lower().replace('
                "' ', '-')\\n\"}",
            },
            {
                "match": "Tests so far: FAILED",
                "content": '{"code": "import re\\n\\ndef slugify(text):\\n    words = '
                "re.findall(r'[a-z0-9]+', text.lower())\\n    return '-'.join(words)\\n\"}",
            },
        ],
    }
}

#: the tests the code must pass
TESTS = textwrap.dedent(
    """
    assert slugify("Hello World") == "hello-world"
    assert slugify("  Fix, until   green!  ") == "fix-until-green"
    assert slugify("v2.0 release") == "v2-0-release"
    """
)


class Patch(BaseModel):
    code: str


class Attempt(BaseModel):
    code: str
    passed: bool
    report: str


@tool(expected_duration_s=0.3, timeout_s=30)
def run_tests(code: str) -> Attempt:
    """Run the test suite against a candidate implementation, in its own process.

    Args:
        code: The Python source of the implementation.
    """
    script = code + "\n" + TESTS
    try:
        proc = subprocess.run(
            [sys.executable, "-I", "-c", script], capture_output=True, text=True, timeout=20
        )
    except subprocess.TimeoutExpired:
        return Attempt(code=code, passed=False, report="FAILED: the tests timed out")
    if proc.returncode == 0:
        return Attempt(code=code, passed=True, report="passed")
    last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    return Attempt(code=code, passed=False, report=f"FAILED: {last}")


def attempt_body() -> Graph:
    """One attempt: write (or fix) the code, then test it."""
    body = Graph("attempt", inputs={"task": str, "report": str, "code": str})
    patch = body.llm(
        "write",
        "Task: {task}\nCurrent code:\n{code}\nTests so far: {report}\n"
        "Answer with the complete implementation.",
        output=Patch,
        inputs={"task": body.input.task, "report": body.input.report, "code": body.input.code},
    )
    tested = body.tool("test", run_tests, inputs={"code": patch.out.code})
    body.output(code=tested.out.code, passed=tested.out.passed, report=tested.out.report)
    return body


def build() -> Graph:
    g = Graph(
        "fix_until_green",
        inputs={"task": InputSpec(str, "Write slugify(text): lowercase words joined by '-'.")},
        description="Write code, run the tests, fix until they pass (bounded).",
        models=MODELS,
    )
    fixed = g.loop(
        "fix",
        attempt_body(),
        inputs={"task": g.input.task, "report": "none", "code": ""},
        carry={"code": "code", "report": "report"},
        until="passed",
        max_iterations=4,
        expected_iterations=2,
    )
    g.output(code=fixed.out.code, passed=fixed.out.passed, report=fixed.out.report)
    return g


graph = build()
