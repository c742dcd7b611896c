"""Runnable example workflows (Python modules and workflow files)."""
