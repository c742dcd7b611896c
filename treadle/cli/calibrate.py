"""`treadle sim calibrate`: against a running server, or a llama-server it starts itself.

Against a server the operator names (`--server URL --profile BASE --model NAME`), the base
profile says what hardware and model it is and the engine limits to simulate. With
`--engine llamacpp` a local `llama-server` (the cached build; see `treadle.testing.llamacpp`)
serves the small random-weight test model, and the base profile is derived from that
model's shape and the server's flags; the server and this process run at a raised
scheduling priority (`nice`, best effort: it needs the privilege), so that other work on a
shared machine barely slows what is measured.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

from treadle.backends.openai_compat.backend import OpenAICompatBackend
from treadle.backends.sim.calibrate import (
    CalibrationReport,
    MixSpec,
    ProbePlan,
    calibrate,
)
from treadle.backends.sim.engine import EngineConfig
from treadle.backends.sim.profile import Profile

QUICK_PLAN = ProbePlan(
    prefill_lengths=(64, 512, 2048, 4096),
    cached_lengths=(1024, 4096),
    decode_batches=(1, 4),
    decode_contexts=(64, 2048),
    reps=2,
)
QUICK_MIX = MixSpec(requests=24)
#: the llama-server the calibration starts: 4 slots of 8192 tokens, one compute thread
LLAMACPP_SLOTS, LLAMACPP_CONTEXT = 4, 32768
#: the niceness the started server and the measuring client run at (lower: sooner)
LLAMACPP_NICE = -10


def run_calibration(
    *,
    server: str | None,
    engine: str | None,
    profile: str | None,
    model: str | None,
    dialect: str,
    quick: bool,
    seed: int,
    echo: Callable[..., Any],
    nice: int = LLAMACPP_NICE,
) -> CalibrationReport:
    plan = QUICK_PLAN if quick else ProbePlan()
    mix = QUICK_MIX if quick else MixSpec()
    if engine == "llamacpp":
        return _on_llamacpp(plan, mix, seed, echo, nice)
    if profile is None or model is None or server is None:
        raise ValueError("--server needs --profile (the hardware and model) and --model")
    base = Profile.load(profile)

    async def go() -> CalibrationReport:
        async with OpenAICompatBackend(server, model, dialect=dialect, timeout_s=600) as backend:
            return await calibrate(backend, base, plan=plan, mix=mix, seed=seed, echo=echo)

    return anyio.run(go)


def set_priority(pids: dict[str, int], nice: int) -> list[str]:
    """Set each process's niceness (best effort); what was done, as report notes."""
    notes = []
    for what, pid in pids.items():
        try:
            os.setpriority(os.PRIO_PROCESS, pid, nice)
        except OSError as exc:  # lowering niceness needs CAP_SYS_NICE
            now = os.getpriority(os.PRIO_PROCESS, pid)
            notes.append(f"{what} (pid {pid}) left at niceness {now}: {exc.strerror}")
        else:
            notes.append(f"{what} (pid {pid}) ran at niceness {nice}")
    return notes


def _on_llamacpp(
    plan: ProbePlan, mix: MixSpec, seed: int, echo: Callable[..., Any], nice: int
) -> CalibrationReport:
    from treadle.testing.llamacpp import MODEL_ALIAS, LlamaServers, tiny_profile
    from treadle.testing.tiny_gguf import SMALL, write_tiny_gguf

    with tempfile.TemporaryDirectory(prefix="treadle-calibrate-") as tmp:
        work = Path(tmp)
        gguf = write_tiny_gguf(work / "small.gguf", SMALL)
        with LlamaServers.start(
            1, gguf, work, slots=LLAMACPP_SLOTS, context=LLAMACPP_CONTEXT, cache_ram_mib=1024
        ) as servers:
            server = servers[0]
            echo(f"llama-server on {server.url} (pid {server.pid}), model {SMALL}")
            base = tiny_profile(SMALL, server)
            notes = []
            if nice:
                assert server.pid is not None
                notes = set_priority({"llama-server": server.pid, "client": os.getpid()}, nice)
                for note in notes:
                    echo(note)

            async def go() -> CalibrationReport:
                async with OpenAICompatBackend(
                    server.url, MODEL_ALIAS, dialect="llamacpp", timeout_s=600
                ) as backend:
                    return await calibrate(
                        backend,
                        base,
                        plan=plan,
                        mix=mix,
                        seed=seed,
                        echo=echo,
                        config=EngineConfig(),
                    )

            report = anyio.run(go)
            report.notes.extend(notes)
            return report
