"""The `planner` node's executor (LLMCompiler-style): the plan's streaming parser, its
prompts, and the executor that dispatches each task as its line arrives.
"""

from treadle.runtime.nodes.planner.executor import EXECUTOR

__all__ = ["EXECUTOR"]
