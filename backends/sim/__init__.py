"""A discrete-event simulator of a GPU LLM serving engine (docs/benchmarks.md, the engine
simulator).

Modules (flat; each docstring states its public API):

- `profile`   — GPU + model + vLLM-limits profiles (`profiles/*.json`) and the roofline.
- `tokenizer` — a deterministic stand-in tokenizer and chat template.
- `blocks`    — `Prompt`: chained block hashes (token ids, opaque segments, trace block ids).
- `kvcache`   — the block pool: cached extents, references, pins, LRU eviction.
- `clock`     — `VirtualClock` (shared discrete-event loop) and `RealTimeClock`.
- `engine`    — `Engine`, `SimRequest`, `EngineConfig`, `EngineMetrics`: one replica.
- `trace`     — Mooncake / Azure trace loading and `replay` over several engines.
- `realtime`  — `SimReplica`: an engine on a real-time clock answering chat requests.
- `backend`   — `SimBackend`: a treadle `Backend` over a `SimReplica`.
- `server`    — `create_app` / `serve`: OpenAI-compatible HTTP per replica (FastAPI,
  uvicorn, prometheus-client); imported on its own, not here.

A typical virtual-time simulation:

    clock = VirtualClock()
    engines = [Engine(Profile.default(), clock, EngineConfig(policy="fcfs"), name=f"r{i}")
               for i in range(8)]
    engines[0].submit_at(1.5, SimRequest(Prompt.from_tokens(ids), 200, on_finish=done))
    clock.run()
"""

from treadle.backends.sim.blocks import Prompt
from treadle.backends.sim.clock import Clock, RealTimeClock, VirtualClock
from treadle.backends.sim.engine import (
    SCHEDULING_POLICIES,
    Engine,
    EngineConfig,
    EngineMetrics,
    PinPressure,
    SchedulingPolicy,
    SimRequest,
    StepInfo,
)
from treadle.backends.sim.profile import Profile, available_profiles
from treadle.backends.sim.tokenizer import encode_chat, encode_completion, tokenize
from treadle.backends.sim.trace import TraceRow, load_azure, load_mooncake, replay, round_robin

__all__ = [
    "SCHEDULING_POLICIES",
    "Clock",
    "Engine",
    "EngineConfig",
    "EngineMetrics",
    "PinPressure",
    "Profile",
    "Prompt",
    "RealTimeClock",
    "SchedulingPolicy",
    "SimRequest",
    "StepInfo",
    "TraceRow",
    "VirtualClock",
    "available_profiles",
    "encode_chat",
    "encode_completion",
    "load_azure",
    "load_mooncake",
    "replay",
    "round_robin",
    "tokenize",
]
