"""Harnesses for tests and benchmarks: child processes (a private redis-server, daemon API and
workers) started and stopped by PID.
"""
