"""The `treadle` command line (typer): run, validate, draw, trace, bench, the simulator and the
daemon's commands.
"""
