"""What agents call: typed tools with JSON Schemas, and a few real built-ins."""

from treadle.tools.base import (
    Tool,
    ToolArgumentError,
    ToolError,
    ToolStats,
    ToolTimeout,
    tool,
)
from treadle.tools.builtins import (
    BUILTINS,
    CalculatorError,
    FetchResult,
    FileContent,
    calculator,
    http_fetch,
    make_http_fetch,
    make_read_file,
    read_file,
)

__all__ = [
    "BUILTINS",
    "CalculatorError",
    "FetchResult",
    "FileContent",
    "Tool",
    "ToolArgumentError",
    "ToolError",
    "ToolStats",
    "ToolTimeout",
    "calculator",
    "http_fetch",
    "make_http_fetch",
    "make_read_file",
    "read_file",
    "tool",
]
