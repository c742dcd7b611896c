"""A run's state and the protocols around it: events, the run context, the journal, values,
errors, and the `StateStore` protocol that the stores implement.
"""
