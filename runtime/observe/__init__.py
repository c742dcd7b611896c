"""Observability built from a run's events: OpenTelemetry tracing, Prometheus metrics, and the
timeline that `treadle trace` draws.
"""
