"""Workflow-atomic scheduling: the program scheduler, per-replica in-flight limits, call
admission, and tool-duration-aware KV pinning.
"""
