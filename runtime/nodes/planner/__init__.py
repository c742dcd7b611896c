"""The LLMCompiler-style planner: the plan's streaming parser, its prompts, and the executor
that dispatches each task as its line arrives.
"""
