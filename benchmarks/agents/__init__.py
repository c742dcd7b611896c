"""`treadle bench agents` (docs/benchmarks.md, "Agent programs"): agent programs from
generators (`workloads.py`) or Copilot agent traces (`copilot.py`) on a simulated cluster
(`sim.py`), under each system (`systems.py`: `baselines.py`, `treadle_system.py`), with the
capacity search (`capacity.py`), the run's pieces (`spec.py`), its driver and command
(`bench.py`) and its report (`report.py`).
"""
