"""Reproducible measurements; each module is also a `treadle bench NAME` subcommand."""
