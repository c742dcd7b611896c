"""OpenAI-compatible servers (vLLM, SGLang, Continuum, llama.cpp, ...): the httpx backend, a
dialect per server for its own fields, and its Prometheus load metrics.
"""
