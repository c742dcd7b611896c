"""The built-in tools, by the names workflow files use for them.

`BUILTINS` maps "calculator", "http_fetch" and "read_file" to their default `Tool`
instances; a workflow file that says `tool: http_fetch` gets `BUILTINS["http_fetch"]`.
The factories (`make_read_file`, `make_http_fetch`) build variants with other limits or
another root for code that wants them.
"""

from __future__ import annotations

from treadle.tools.base import Tool
from treadle.tools.calc import CalculatorError, calculator, evaluate
from treadle.tools.files import FileContent, make_read_file, read_file
from treadle.tools.web import FetchResult, http_fetch, make_http_fetch

BUILTINS: dict[str, Tool] = {
    "calculator": calculator,
    "http_fetch": http_fetch,
    "read_file": read_file,
}

__all__ = [
    "BUILTINS",
    "CalculatorError",
    "FetchResult",
    "FileContent",
    "calculator",
    "evaluate",
    "http_fetch",
    "make_http_fetch",
    "make_read_file",
    "read_file",
]
