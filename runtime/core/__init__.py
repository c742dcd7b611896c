"""The core of execution: the `Runtime`, the event-driven orchestrator, a run's context, its
events, journal and values.
"""
