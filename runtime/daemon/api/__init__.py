"""The daemon's HTTP API (FastAPI): routes, request and response schemas, authentication,
errors, SSE event streams.
"""
