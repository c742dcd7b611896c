"""The calibration's fit and its validation replay, on measurements made by a known profile:
the fit must find that profile's efficiencies again, and the replay must then agree with the
measurements. (The real-server run is `treadle sim calibrate`, exercised in
tests/realengine.)"""

from __future__ import annotations

import dataclasses
import math

import pytest

from treadle.backends.sim.calibrate import (
    carries_output,
    mape,
    simulate_mix,
    validate,
    validate_replays,
)
from treadle.backends.sim.calibration_fit import Sample, calibrated_profile, fit_efficiency
from treadle.backends.sim.engine import EngineConfig
from treadle.backends.sim.profile import Efficiency, Profile


def truth() -> Profile:
    base = Profile.default()
    return base.model_copy(
        update={
            "efficiency": Efficiency(mfu=0.45, attention_mfu=0.2, mbu=0.7, step_overhead_s=0.003),
            "sources": {**base.sources, "efficiency.attention_mfu": "test"},
        }
    )


def probes(p: Profile, overhead: float) -> list[Sample]:
    out = []
    for n in (64, 512, 2048, 8192, 20000):
        out.append(Sample("prefill", n, ttft_s=overhead + p.prefill_time(n)))
    for n in (4096, 16384):
        out.append(Sample("cached", n + 40, n, ttft_s=overhead + p.prefill_time(n + 40, n)))
    for b in (1, 16, 64):
        for c in (128, 8000):
            out.append(Sample("decode", c, batch=b, context=c, decode_s=p.decode_step_time(b, c)))
    return out


def test_the_fit_recovers_a_known_profile() -> None:
    real = truth()
    fit = fit_efficiency(Profile.default(), probes(real, overhead=0.004))
    assert fit["fit_mape"] < 0.01
    assert fit["mfu"] == pytest.approx(0.45, rel=0.05)
    assert fit["attention_mfu"] == pytest.approx(0.2, rel=0.1)
    assert fit["mbu"] == pytest.approx(0.7, rel=0.05)
    assert fit["step_overhead_s"] == pytest.approx(0.003, rel=0.1)
    assert fit["request_overhead_s"] == pytest.approx(0.004, rel=0.1)


def _tiled(base: Profile, tile: int, **rates: float) -> Profile:
    return base.model_copy(
        update={
            "efficiency": Efficiency(**rates, attention_query_tile=tile),
            "sources": {**base.sources, "efficiency.attention_query_tile": "test"},
        }
    )


def _tile_probes(p: Profile, cached: tuple[int, ...], prefill: tuple[int, ...]) -> list[Sample]:
    out = [Sample("prefill", n, ttft_s=0.01 + p.prefill_time(n)) for n in prefill]
    for n in cached:
        for suffix in (32, 512):
            t = 0.01 + p.prefill_time(n + suffix, n)
            out.append(Sample("cached", n + suffix, n, ttft_s=t))
    for b in (1, 4, 32):
        for c in (64, 3072):
            t = p.decode_step_time(b, c)
            out.append(Sample("decode", c, batch=b, context=c, decode_s=t))
    return out


def test_a_fit_with_a_small_query_tile_predicts_shapes_it_never_saw() -> None:
    """A CPU-like engine whose attention re-reads the cached KV every 2 query tokens. (For
    chunks of a few tiles or more, a tile of T costs what compute-bound attention at the
    KV rate / T does, so any small tile fits; what matters is that the profile predicts.)"""
    base = Profile.load("llamacpp_cpu_small")
    real = _tiled(
        base, 2, mfu=0.06, attention_mfu=0.03, mbu=0.02, kv_mbu=0.006, step_overhead_s=0.0
    )
    fit = fit_efficiency(base, _tile_probes(real, cached=(1024, 4096), prefill=(32, 2048, 4096)))
    assert fit["fit_mape"] < 0.01
    profile = calibrated_profile(base, fit, server="s", served_model="m", samples=1)
    for n, cached in ((3100, 3000), (3000, 1000), (700, 0)):
        predicted = profile.prefill_time(n, cached)
        assert predicted == pytest.approx(real.prefill_time(n, cached), rel=0.03)
    predicted = profile.decode_step_time(2, 2000)
    assert predicted == pytest.approx(real.decode_step_time(2, 2000), rel=0.03)


def test_a_calibrated_profile_says_where_its_numbers_come_from() -> None:
    fit = fit_efficiency(Profile.default(), probes(truth(), overhead=0.0))
    profile = calibrated_profile(
        Profile.default(), fit, server="http://gpu1:8000", served_model="llama", samples=17
    )
    assert profile.calibration is not None and profile.calibration.samples == 17
    assert "http://gpu1:8000" in profile.sources["efficiency.mfu"]
    assert profile.efficiency.attention_mfu == pytest.approx(fit["attention_mfu"])
    # round trip through the file format
    again = Profile.model_validate_json(profile.model_dump_json())
    assert again == profile


def test_validation_replays_a_mix_on_the_engine() -> None:
    """A mix 'measured' on the true profile's engine is predicted exactly by that profile
    (and not by one with a different speed)."""
    real = truth()
    mix = [
        Sample(
            "mix",
            1000 + 200 * i,
            output_tokens=32,
            start_s=0.05 * i,
            prefix=i % 2 or None,
            prefix_tokens=512 if i % 2 else 0,
        )
        for i in range(12)
    ]
    config = EngineConfig()
    for s, (ttft, decode) in zip(mix, simulate_mix(real, mix, config), strict=True):
        s.ttft_s, s.decode_s = ttft, decode
    exact = validate(real, [mix], config)
    assert exact["ttft_mape"] == pytest.approx(0.0, abs=1e-9)
    assert exact["decode_mape"] == pytest.approx(0.0, abs=1e-9)
    slow = real.model_copy(
        update={"efficiency": Efficiency(mfu=0.2, mbu=0.3, step_overhead_s=0.01)}
    )
    assert validate(slow, [mix], config)["ttft_mape"] > 0.3


def test_mape_ignores_zero_measurements() -> None:
    assert mape([(1.1, 1.0), (5.0, 0.0)]) == pytest.approx(0.1)
    assert math.isnan(mape([]))


def test_validation_takes_each_requests_median_over_replays_and_reports_each() -> None:
    """Three replays of a mix, one of them stalled (every time doubled): the error is
    taken against each request's median, and the stalled replay's own error and the
    spread between replays are reported beside it, not hidden."""
    real = truth()
    config = EngineConfig()
    mix = [Sample("mix", 800 + 300 * i, output_tokens=24, start_s=0.2 * i) for i in range(8)]
    for s, (ttft, decode) in zip(mix, simulate_mix(real, mix, config), strict=True):
        s.ttft_s, s.decode_s = ttft, decode
    stalled = [dataclasses.replace(s, ttft_s=2 * s.ttft_s, decode_s=2 * s.decode_s) for s in mix]
    v = validate_replays(real, [[mix, stalled, list(mix)]], config)
    assert v["requests"] == 8 and v["replays"] == 3
    assert v["ttft_mape"] == pytest.approx(0.0, abs=1e-9)
    assert v["ttft_mape_each_replay"][1] == pytest.approx(0.5)
    assert v["decode_mape_each_replay"][1] == pytest.approx(0.5)
    assert v["ttft_spread_p50"] == pytest.approx(1.0)  # (2x - 1x) / 1x


@pytest.mark.parametrize(
    ("line", "output"),
    [
        ('data: {"choices":[{"delta":{"role":"assistant","content":null}}]}', False),
        ('data: {"choices":[{"delta":{"content":""}}]}', False),
        ('data: {"choices":[{"delta":{"content":"ab"}}]}', True),
        ('data: {"choices": [{"delta": {"content": "\\n"}}]}', True),
        ('data: {"choices":[{"delta":{"tool_calls":[{"index":0}]}}]}', True),
        ('data: {"choices":[],"usage":{"prompt_tokens":5}}', False),
    ],
)
def test_the_probe_client_tells_output_chunks_from_the_raw_line(line: str, output: bool) -> None:
    assert carries_output(line) is output
