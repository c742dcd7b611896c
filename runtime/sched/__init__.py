"""Workflow-atomic scheduling: the scheduling core (`scheduler.py`, over `entities.py`),
KV residency of programs (`residency.py`) and their admission queue (`waitlist.py`),
per-lane in-flight limits (`limits.py`), tool-duration-aware KV pinning (`pinning.py`), and
the runtime's `CallAdmission` over all of it (`admission.py`).
"""
