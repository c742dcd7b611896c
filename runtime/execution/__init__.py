"""Running a program: the `Runtime` (start, resume, cancel) and the event-driven orchestrator
that executes a run's nodes as their inputs become ready."""
