"""A discrete-event simulator of a GPU LLM serving engine (see BENCHMARKS.md)."""
