"""Harnesses for tests and benchmarks: child processes (a private redis-server, daemon API and
workers) started and stopped by PID, and llama.cpp's `llama-server` (built once, cached) with
a tiny random-weight model written at run time (`llamacpp`, `tiny_gguf`).
"""
