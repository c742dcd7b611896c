"""The calibration and the real-engine benchmarks, end to end at toy sizes: they run against
real servers and produce the reports their commands print (the numbers themselves are the
benchmarks' business, never asserted here)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from realengine_support import StartServers

from treadle.backends.openai_compat.backend import OpenAICompatBackend
from treadle.backends.sim.calibrate import MixSpec, ProbePlan, calibrate
from treadle.backends.sim.profile import Profile
from treadle.benchmarks.agents.realengine import Setup, run_agents_llamacpp
from treadle.benchmarks.dispatch_llamacpp import run_llamacpp_dispatch
from treadle.testing.llamacpp import MODEL_ALIAS, tiny_profile
from treadle.testing.tiny_gguf import TINY

pytestmark = pytest.mark.anyio

PLAN = ProbePlan(
    prefill_lengths=(64, 512, 1500),
    cached_lengths=(512,),
    decode_batches=(1, 2),
    decode_contexts=(64,),
    decode_output=48,
    reps=1,
)


async def test_calibration_fits_and_validates_against_a_real_server(
    start_servers: StartServers, tmp_path: Path
) -> None:
    (server,) = start_servers(1)
    base = tiny_profile(TINY, server)
    async with OpenAICompatBackend(server.url, MODEL_ALIAS, dialect="llamacpp") as backend:
        report = await calibrate(backend, base, plan=PLAN, mix=MixSpec(requests=8))
    profile = report.profile
    assert profile.calibration is not None and profile.calibration.server == server.url
    assert all("calibrate" in profile.sources[f"efficiency.{k}"] for k in ("mfu", "mbu"))
    v = report.validation
    assert v["requests"] == 8 and math.isfinite(v["ttft_mape"]) and math.isfinite(v["decode_mape"])
    kinds = {s.kind for s in report.samples}
    assert kinds == {"prefill", "cached", "decode", "mix"}
    # the profile file round-trips and loads as the simulator's
    path = tmp_path / "calibrated.json"
    path.write_text(profile.model_dump_json())
    assert Profile.load(path) == profile


def test_dispatch_bench_reports_every_policy_beside_the_simulator() -> None:
    config, results, ratios = run_llamacpp_dispatch(
        requests=8,
        reps=1,
        rate=20.0,
        block_tokens=8,
        max_output=4,
        profile_name="llamacpp_cpu_small",
        trace_path=Path(__file__).resolve().parents[2]
        / "benchmarks/data/mooncake/conversation_trace.jsonl",
        seed=0,
        echo=lambda *_: None,
    )
    assert config["requests"] == 8 and set(results) == {
        "round_robin",
        "least_load",
        "cache_aware",
        "treadle",
    }
    for r in results.values():
        assert r["prompt_tokens"] > 0 and r["ttft_p50_s"] > 0
        assert r["predicted"]["prompt_tokens"] > 0
    assert "treadle_vs_round_robin_cached_tokens" in ratios


def test_agents_bench_runs_every_mode() -> None:
    _, results, ratios = run_agents_llamacpp(
        setup=Setup(programs=2, turns=1, slots=1, system_words=40, result_words=10, reps=1),
        profile_name="llamacpp_cpu_small",
        echo=lambda *_: None,
    )
    assert set(results) == {"none", "pin", "offload", "pin+offload", "none+ram-cache"}
    assert results["none"]["predicted"] is not None and results["offload"]["predicted"] is None
    assert all(r["prompt_tokens"] > 0 for r in results.values())
    assert "offload_recomputed_vs_none" in ratios
