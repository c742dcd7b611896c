"""The systems of `treadle bench agents`, by name.

`baselines.py` describes the baselines (`vllm` — the fair one —, `vllm-least-load`,
`vllm-rr`, `continuum`, `autellix`) and the physical limit `bound`; `treadle_system.py`
describes `treadle`. All run on the same simulated engines (`backends/sim`), in the same
process, on the same programs and seeds.
"""

from __future__ import annotations

from collections.abc import Callable

from treadle.benchmarks.agents.baselines import (
    AutellixSystem,
    BoundSystem,
    ContinuumSystem,
    VLLMLeastLoadSystem,
    VLLMRoundRobinSystem,
    VLLMSystem,
)
from treadle.benchmarks.agents.frontend import Frontend
from treadle.benchmarks.agents.scaleout import PerWorkerSchedulers
from treadle.benchmarks.agents.treadle_system import TreadleSystem

FACTORIES: dict[str, Callable[[], Frontend]] = {
    "vllm": VLLMSystem,
    "vllm-least-load": VLLMLeastLoadSystem,
    "vllm-rr": VLLMRoundRobinSystem,
    "continuum": ContinuumSystem,
    "autellix": AutellixSystem,
    "treadle": TreadleSystem,
    "treadle-per-worker": PerWorkerSchedulers,
    "bound": BoundSystem,
}
SYSTEMS = tuple(FACTORIES)


def make_system(name: str) -> Frontend:
    try:
        return FACTORIES[name]()
    except KeyError:
        raise ValueError(f"unknown system {name!r}; choose from {', '.join(SYSTEMS)}") from None
