"""Dispatch across replicas of one model: prefix-aware routing policies and the `pool` backend
that applies them.
"""
