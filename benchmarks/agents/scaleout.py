"""Scale-out in `treadle bench agents`: what one scheduler for every worker is worth.

The daemon scales out by workers on one Redis; each run lands on one worker. Before
`treadle gateway` each worker had its own scheduler, which saw only its own runs but sent
to the same replicas. `treadle-per-worker` models that: `WORKERS` independent copies of
treadle's scheduler (`TreadleSystem`), each believing it has every replica to itself (the
replicas' full KV budgets and seats), with programs spread over them by program id as a
work queue spreads runs. Every copy admits, orders and limits only its own programs, so
the replicas are over-committed up to `WORKERS` times and tenants' shares are enforced
per worker, not overall.

The shared scheduler is `treadle` itself: the gateway runs the same scheduler over every
worker's calls (its own cost per call, about a millisecond through the HTTP hop, is
measured by `treadle bench gateway` and not modelled here; the calls here take seconds).
"""

from __future__ import annotations

import zlib
from typing import Any

from treadle.backends.sim import EngineConfig, SimRequest
from treadle.benchmarks.agents.frontend import Frontend
from treadle.benchmarks.agents.sim import CallRun, ProgramRun, Simulation
from treadle.benchmarks.agents.treadle_system import TreadleSystem

#: workers (each with its own scheduler) the programs are spread over
WORKERS = 4


class PerWorkerSchedulers(Frontend):
    """`WORKERS` schedulers, each seeing its share of the programs (module docstring)."""

    name = "treadle-per-worker"

    def __init__(self, workers: int = WORKERS) -> None:
        super().__init__()
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.workers = [TreadleSystem() for _ in range(workers)]

    def engine_config(self) -> EngineConfig:
        return self.workers[0].engine_config()

    def attach(self, sim: Simulation) -> None:
        self.sim = sim
        for worker in self.workers:
            worker.attach(sim)

    def _worker(self, program_id: str) -> TreadleSystem:
        # a stable spread (Python's str hash is salted per process)
        return self.workers[zlib.crc32(program_id.encode()) % len(self.workers)]

    def program_arrived(self, prog: ProgramRun) -> None:
        self._worker(prog.program_id).program_arrived(prog)

    def submit(self, call: CallRun) -> None:
        self._worker(call.prog.program_id).submit(call)

    def on_first_token(self, call: CallRun, req: SimRequest) -> None:
        self._worker(call.prog.program_id).on_first_token(call, req)

    def on_finish(self, call: CallRun, req: SimRequest) -> None:
        self._worker(call.prog.program_id).on_finish(call, req)

    def tool_done(self, call: CallRun, tool: str, duration_s: float) -> None:
        self._worker(call.prog.program_id).tool_done(call, tool, duration_s)

    def program_done(self, prog: ProgramRun) -> None:
        self._worker(prog.program_id).program_done(prog)

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"workers": len(self.workers)}
        for worker in self.workers:
            for key, value in worker.stats().items():
                if isinstance(value, int | float):
                    out[key] = out.get(key, 0) + value
        return out
