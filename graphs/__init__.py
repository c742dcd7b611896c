"""Declaring programs: typed DAG specs, the SDK builder, workflow files, validation and
static analysis."""
