"""Redis for the tests: the package's own `RedisServer` (a private `redis-server` on a free
port, with or without an append-only file), and why Redis tests skip when it is missing.
The fixtures are in `tests/conftest.py`."""

from treadle.testing.processes import RedisServer, free_port, redis_binary

REDIS_BINARY = redis_binary()
SKIP_REASON = "redis-server is not installed (apt-get install redis-server) - Redis tests skipped"

__all__ = ["REDIS_BINARY", "SKIP_REASON", "RedisServer", "free_port"]
