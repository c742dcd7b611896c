"""treadle: an async runtime for agent workflows."""
