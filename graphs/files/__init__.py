"""Workflow files: the file format's pydantic schema, the YAML/JSON loader with line numbers,
and `pkg.mod:attr` references.
"""
