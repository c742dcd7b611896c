"""Executors of the node kinds that call out: LLM conversations, tool calls, the streaming
planner.
"""
