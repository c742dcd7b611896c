"""The store tests use the shared Redis fixtures of `tests/conftest.py`
(`redis_server`, `redis_url`, `aof_redis`)."""
