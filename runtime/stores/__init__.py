"""`StateStore` implementations: memory (default), sqlite (CLI), redis (daemon, workers)."""

from treadle.runtime.stores.memory import MemoryStore

__all__ = ["MemoryStore"]
