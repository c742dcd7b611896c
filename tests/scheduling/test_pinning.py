"""Tool-duration estimates and the pinning policy: quantiles that converge, a prior from
the declared duration, the cost-benefit decision, and the release rules of `PinBook`."""

from __future__ import annotations

import math
import random
from typing import Any

import anyio
import pytest

from treadle import tool
from treadle.runtime.sched.pinning import (
    DurationEstimator,
    Pin,
    PinBook,
    PinPolicy,
    PinRequest,
    ToolDurations,
    pressure_price,
)


def test_prior_is_an_exponential_with_the_declared_mean() -> None:
    est = DurationEstimator(2.0)
    for q in (0.1, 0.5, 0.9, 0.99):
        assert est.quantile(q) == pytest.approx(-2.0 * math.log(1 - q))
    assert est.mean() == pytest.approx(2.0)
    assert est.expected_min(1e9) == pytest.approx(2.0)


@pytest.mark.parametrize("seed", [1, 2])
def test_quantiles_converge_on_a_known_distribution(seed: int) -> None:
    """Lognormal(mu=0, sigma=1) durations; the declared expectation (5 s) is wrong on
    purpose: the estimate must move from the prior to the data."""
    rng = random.Random(seed)
    est = DurationEstimator(5.0, window=4096)
    z = {0.1: -1.2816, 0.5: 0.0, 0.9: 1.2816, 0.99: 2.3263}
    truth = {q: math.exp(v) for q, v in z.items()}
    errors = []
    for n in (50, 4000):
        while est.count < n:
            est.observe(rng.lognormvariate(0.0, 1.0))
        errors.append(max(abs(est.quantile(q) / truth[q] - 1) for q in (0.1, 0.5, 0.9)))
    assert errors[1] < errors[0]
    assert errors[1] < 0.06, errors
    assert est.quantile(0.99) == pytest.approx(truth[0.99], rel=0.15)
    # the CDF and the quantile agree
    for q in (0.25, 0.5, 0.75, 0.95):
        assert est.cdf(est.quantile(q)) >= q - 1e-9


def test_window_forgets_old_behaviour() -> None:
    est = DurationEstimator(1.0, window=100, prior_weight=0)
    for _ in range(100):
        est.observe(1.0)
    for _ in range(100):
        est.observe(10.0)
    assert est.quantile(0.5) == pytest.approx(10.0)


def test_bad_durations_are_refused() -> None:
    est = DurationEstimator(1.0)
    with pytest.raises(ValueError):
        est.observe(-1.0)
    with pytest.raises(ValueError):
        est.observe(float("nan"))
    with pytest.raises(ValueError):
        est.quantile(1.0)


@pytest.mark.anyio
async def test_tool_durations_follow_every_call_of_a_registered_tool() -> None:
    @tool(expected_duration_s=3.0)
    async def slowish(x: int) -> int:
        """Wait a little."""
        await anyio.sleep(0.001)
        return x

    durations = ToolDurations()
    durations.register(slowish)
    est = durations.estimator("slowish")
    assert est.expected_s == 3.0 and est.count == 0
    for i in range(5):
        await slowish.invoke({"x": i})
    assert est.count == 5
    # five real calls of ~1 ms pull the median well below the declared 3 s
    assert est.quantile(0.5) < DurationEstimator(3.0).quantile(0.5)


def _request(**kw: Any) -> PinRequest:
    base: dict[str, Any] = {
        "tokens": 20_000,
        "prefill_s": 1.0,
        "capacity_tokens": 400_000,
        "pressure": 0.3,
        "tool": "grep",
        "is_last_step": False,
    }
    base.update(kw)
    return PinRequest(**base)


def test_never_a_pin_after_the_last_llm_step() -> None:
    durations = ToolDurations()
    durations.declare("grep", 0.2)
    policy = PinPolicy(durations)
    assert policy.decide(_request()).pin
    decision = policy.decide(_request(is_last_step=True))
    assert not decision.pin and decision.reason == "last LLM step"
    assert not policy.decide(_request(tool=None)).pin


def test_ttl_is_a_quantile_of_the_predicted_duration() -> None:
    durations = ToolDurations(prior_weight=0)
    rng = random.Random(4)
    for _ in range(500):
        durations.observe("grep", rng.uniform(0.1, 0.5))
    policy = PinPolicy(durations, quantiles=(0.5, 0.9, 0.99))
    decision = policy.decide(_request())
    assert decision.pin and decision.quantile in (0.5, 0.9, 0.99)
    assert decision.ttl_s == pytest.approx(durations.estimator("grep").quantile(decision.quantile))


def test_cost_beats_saving_when_memory_is_tight_or_the_tool_is_slow() -> None:
    durations = ToolDurations(prior_weight=0)
    rng = random.Random(5)
    for _ in range(300):
        durations.observe("tests", rng.uniform(30.0, 120.0))
        durations.observe("grep", rng.uniform(0.1, 0.5))
    policy = PinPolicy(durations)
    # a short tool under low pressure: keep the KV
    assert policy.decide(_request(tool="grep", pressure=0.3)).pin
    # a two-minute test run holding 50k tokens of a 100k-token cache at high pressure: no
    big = _request(tool="tests", tokens=50_000, capacity_tokens=100_000, pressure=0.9)
    decision = policy.decide(big)
    assert not decision.pin and decision.cost_s > decision.saving_s
    # the same short tool when memory is over-subscribed: no
    assert not policy.decide(_request(tool="grep", pressure=1.0, tokens=200_000)).pin
    assert pressure_price(0.0) == 0 and pressure_price(0.5) == pytest.approx(1.0)


def _pin(pid: str, lane: int = 0, tokens: int = 100, saving: float = 1.0, now: float = 0.0) -> Pin:
    return Pin(pid, f"{pid}-call", "node", lane, tokens, 5.0, now, now + 5.0, saving)


def test_pin_released_on_next_call_on_cancel_and_at_expiry() -> None:
    seen: list[tuple[str, str, str, bool]] = []
    book = PinBook(
        listeners=[lambda kind, p, reason, used: seen.append((kind, p.program_id, reason, used))]
    )
    book.set(_pin("a"))
    book.set(_pin("b"))
    book.set(_pin("c"))
    assert book.on_next_call("a", now=1.0) is not None
    assert book.cancel("b") is not None
    assert book.expire(now=10.0)[0].program_id == "c"
    assert len(book) == 0
    assert seen == [
        ("set", "a", "", False),
        ("set", "b", "", False),
        ("set", "c", "", False),
        ("released", "a", "next_call", True),
        ("released", "b", "cancelled", False),
        ("released", "c", "expired", False),
    ]
    # a next call after the deadline found nothing: not counted as used
    book.set(_pin("d"))
    book.on_next_call("d", now=100.0)
    assert seen[-1] == ("released", "d", "expired", False)


def test_shedding_under_pressure_releases_the_least_valuable_pins_first() -> None:
    book = PinBook()
    book.set(_pin("cheap", tokens=1000, saving=0.1))
    book.set(_pin("dear", tokens=1000, saving=5.0))
    book.set(_pin("other-lane", lane=1, tokens=1000, saving=0.01))
    shed = book.shed(lane=0, tokens_needed=500, now=1.0)
    assert [p.program_id for p in shed] == ["cheap"]
    assert book.get("dear") is not None and book.get("other-lane") is not None
    assert book.released == {"pressure": 1}
