"""Routing logic: chunk hashing, the aged prefix index, load tracking and each policy."""

from __future__ import annotations

import subprocess
import sys

import pytest

from treadle.backends.base import LLMRequest, Message, SchedulingHints
from treadle.backends.dispatch.routing import (
    CacheAwareConfig,
    CacheAwarePolicy,
    LeastLoadPolicy,
    NoReplicaAvailable,
    PrefixIndex,
    ReplicaState,
    RequestFeatures,
    RoundRobinPolicy,
    Router,
    TreadleRoutingConfig,
    TreadleRoutingPolicy,
    chain_block_ids,
    chain_text_chunks,
    chain_token_chunks,
    make_routing_policy,
)
from treadle.backends.sim.tokenizer import SIM_TOKENS, encode_chat
from treadle.backends.tokens import CharTokenEstimator, prompt_text


def feats(
    blocks: list[int], *, tokens: int | None = None, now: float = 0.0, **kw: object
) -> RequestFeatures:
    """Features of a prompt made of 16-token blocks with the given content ids."""
    return RequestFeatures(
        chunks=chain_block_ids(blocks),
        prompt_tokens=tokens if tokens is not None else 16 * len(blocks),
        chunk_tokens=16,
        now=now,
        **kw,
    )


def states(n: int, **per_replica: list[int]) -> list[ReplicaState]:
    out = [ReplicaState(index=i, name=f"r{i}") for i in range(n)]
    for attr, values in per_replica.items():
        for state, value in zip(out, values, strict=True):
            setattr(state, attr, value)
    return out


# -- chunking ----------------------------------------------------------------------------


def test_chained_hashes_name_prefixes_not_blocks() -> None:
    a = chain_token_chunks(list(range(48)), 16)
    b = chain_token_chunks(list(range(32)) + [99] * 16, 16)
    assert len(a) == 3 and a[:2] == b[:2] and a[2] != b[2]
    # the same block content after a different prefix is a different key
    c = chain_token_chunks([7] * 16 + list(range(16, 32)), 16)
    assert c[1] != a[1]
    # a partial tail chunk is not a key
    assert chain_token_chunks(list(range(47)), 16) == a[:2]
    assert chain_block_ids([1, 2, 3])[:2] == chain_block_ids([1, 2, 4])[:2]
    assert chain_block_ids([5, 2])[1] != chain_block_ids([1, 2])[1]


def test_text_chunks_and_request_features_share_prefixes() -> None:
    assert chain_text_chunks("abcdefgh", 4)[0] == chain_text_chunks("abcdxyzw", 4)[0]
    with pytest.raises(ValueError):
        chain_text_chunks("abc", 0)
    system = Message(role="system", content="You are a careful assistant. " * 40)
    one = LLMRequest(
        model="m", messages=[system, Message(role="user", content="first question " * 20)]
    )
    two = LLMRequest(
        model="m",
        messages=[system, Message(role="user", content="another, different question " * 20)],
        hints=SchedulingHints(program_id="p1", pin_ttl_s=2.0),
    )
    f1 = RequestFeatures.from_request(one, chunk_tokens=16)
    f2 = RequestFeatures.from_request(two, chunk_tokens=16)
    assert f1.prompt_tokens > 0 and len(f1.chunks) >= 10
    shared = sum(1 for x, y in zip(f1.chunks, f2.chunks, strict=False) if x == y)
    assert shared >= 10  # the long system prompt is a common prefix
    assert f1.chunks[-1] != f2.chunks[-1]
    assert f2.program_id == "p1" and f1.program_id is None


# -- the prefix index ----------------------------------------------------------------------


def test_index_matches_longest_prefix() -> None:
    index = PrefixIndex()
    index.insert(chain_block_ids([1, 2, 3]), now=0.0)
    assert index.match(chain_block_ids([1, 2, 3, 4]), now=1.0) == 3
    assert index.match(chain_block_ids([1, 2, 9]), now=1.0) == 2
    assert index.match(chain_block_ids([2, 3]), now=1.0) == 0
    assert len(index) == 3


def test_index_evicts_least_recently_touched_tail_first() -> None:
    index = PrefixIndex(capacity_chunks=4)
    old = chain_block_ids([1, 2, 3])
    index.insert(old, now=0.0)
    index.insert(chain_block_ids([7, 8]), now=1.0)
    # capacity 4 < 5 chunks: the old chain's tail went first, its root survives
    assert len(index) == 4
    assert index.match(old, now=2.0) == 2
    # touching the old chain again makes it recent, so the other chain's tail goes next
    index.insert(old, now=3.0)
    assert index.match(old, now=3.0) == 3
    assert index.match(chain_block_ids([7, 8]), now=3.0) == 1


def test_index_ttl_ages_out_entries() -> None:
    index = PrefixIndex(ttl_s=10.0)
    chunks = chain_block_ids([1, 2])
    index.insert(chunks, now=0.0)
    assert index.match(chunks, now=9.0) == 2
    assert index.match(chunks, now=11.0) == 0
    index.evict_to(None, now=11.0)
    assert len(index) == 0


def test_index_forget_and_adaptive_capacity() -> None:
    index = PrefixIndex(capacity_chunks=1000)
    chunks = chain_block_ids([1, 2, 3, 4])
    index.insert(chunks, now=0.0)
    index.forget(chunks, keep=1)
    assert index.match(chunks, now=0.0) == 1
    index.observe(predicted_tokens=64, actual_tokens=16, adapt=True)
    assert index.capacity == 950
    index.observe(predicted_tokens=64, actual_tokens=64, adapt=True)
    assert index.capacity == 955
    assert (index.predicted_tokens, index.actual_tokens) == (128, 80)
    for _ in range(200):
        index.observe(64, 0, adapt=True)
    assert index.capacity == 125  # never below an eighth of the configured capacity
    with pytest.raises(ValueError):
        PrefixIndex(capacity_chunks=0)


# -- simple policies and the router ------------------------------------------------------------


def test_round_robin_skips_unavailable() -> None:
    policy = RoundRobinPolicy()
    replicas = states(3)
    replicas[1].available = False
    picks = [policy.choose(feats([1]), replicas) for _ in range(4)]
    assert picks == [0, 2, 0, 2]
    for r in replicas:
        r.available = False
    with pytest.raises(NoReplicaAvailable):
        policy.choose(feats([1]), replicas)


def test_least_load_uses_outstanding_tokens() -> None:
    replicas = states(3, pending_prefill_tokens=[500, 100, 100], in_flight=[1, 3, 2])
    assert LeastLoadPolicy().choose(feats([1]), replicas) == 2


def test_router_tracks_load_through_a_request() -> None:
    router = Router(LeastLoadPolicy(), ["a", "b"])
    t1 = router.route(feats([1, 2, 3], output_tokens=10))
    assert t1.replica == 0
    assert router.states[0].in_flight == 1
    assert router.states[0].pending_prefill_tokens == 48
    assert router.states[0].pending_decode_tokens == 10
    t2 = router.route(feats([4]))
    assert t2.replica == 1
    router.prefill_done(t1)
    assert router.states[0].pending_prefill_tokens == 0
    router.finish(t1, now=1.0, cached_tokens=0)
    router.finish(t1, now=1.0)  # a second report of the same end changes nothing
    assert router.states[0].in_flight == 0 and router.states[0].outstanding_tokens == 0


def test_make_routing_policy_rejects_unknown_names_and_options() -> None:
    with pytest.raises(ValueError, match="unknown routing policy"):
        make_routing_policy("random", 2)
    with pytest.raises(ValueError, match="takes no options"):
        make_routing_policy("round_robin", 2, cache_threshold=0.1)
    assert make_routing_policy("cache_aware", 2, cache_threshold=0.1).name == "cache_aware"


# -- cache_aware -------------------------------------------------------------------------------


def test_cache_aware_defaults_are_sgl_router_cli_defaults() -> None:
    cfg = CacheAwareConfig()
    assert (cfg.cache_threshold, cfg.balance_abs_threshold, cfg.balance_rel_threshold) == (
        0.3,
        64,
        1.5,
    )
    assert (cfg.eviction_interval_s, cfg.max_tree_size) == (120.0, 2**26)


def test_cache_aware_follows_a_match_above_threshold() -> None:
    policy = CacheAwarePolicy(3)
    replicas = states(3)
    policy.trees[2].insert(chain_block_ids([1, 2, 3, 4]), now=0.0)
    policy.trees[0].insert(chain_block_ids([9] * 20), now=0.0)  # replica 0: big tree
    # 2 of 5 blocks = 0.4 > 0.3: best match wins
    assert policy.choose(feats([1, 2, 7, 8, 9]), replicas) == 2
    assert policy.last_cached_tokens == 32


def test_cache_aware_low_match_goes_to_smallest_tree() -> None:
    policy = CacheAwarePolicy(3)
    replicas = states(3)
    policy.trees[2].insert(chain_block_ids([1, 2, 3, 4]), now=0.0)
    policy.trees[0].insert(chain_block_ids([9, 9, 9, 9, 9, 9]), now=0.0)
    # 1 of 4 blocks = 0.25 <= 0.3: the smallest tree (replica 1, empty) gets it
    assert policy.choose(feats([1, 5, 6, 7]), replicas) == 1
    # ... and its tree now holds the request
    assert policy.trees[1].match(chain_block_ids([1, 5, 6, 7]), now=0.0) == 4


def test_cache_aware_imbalance_falls_back_to_shortest_queue() -> None:
    policy = CacheAwarePolicy(3)
    policy.trees[0].insert(chain_block_ids([1, 2, 3, 4]), now=0.0)
    request = feats([1, 2, 3, 4])
    # max - min = 70 > 64 and 80 > 1.5 * 10: imbalanced, shortest queue
    assert policy.choose(request, states(3, in_flight=[80, 10, 30])) == 1
    # max - min = 60 <= 64: balanced, so the full match wins even on the busiest replica
    assert policy.choose(request, states(3, in_flight=[70, 10, 30])) == 0
    # abs exceeded but relative not (100 <= 1.5 * 70): balanced
    assert policy.choose(request, states(3, in_flight=[100, 70, 30 + 70])) == 0


def test_cache_aware_trims_trees_only_at_eviction_interval() -> None:
    policy = CacheAwarePolicy(1, CacheAwareConfig(max_tree_size=32, eviction_interval_s=120.0))
    replicas = states(1)
    policy.choose(feats(list(range(10)), now=0.0), replicas)
    policy.choose(feats(list(range(100, 110)), now=60.0), replicas)
    assert len(policy.trees[0]) == 20  # no trim before the interval
    policy.choose(feats([500], now=121.0), replicas)
    assert len(policy.trees[0]) <= 32 // 16 + 1


# -- treadle -----------------------------------------------------------------------------------


def treadle(n: int = 3, **cfg: object) -> TreadleRoutingPolicy:
    return TreadleRoutingPolicy(n, TreadleRoutingConfig(prefill_tokens_per_s=1000.0, **cfg))


def test_treadle_prefers_match_when_cheaper_than_queueing_elsewhere() -> None:
    policy = treadle()
    blocks = list(range(100))  # 1,600 tokens
    policy.indexes[1].insert(chain_block_ids(blocks), now=0.0)
    # replica 1 holds the prompt but has 500 tokens queued (0.5 s); replica 0 is idle but
    # would prefill 1,600 tokens (1.6 s): the match wins
    replicas = states(3, pending_prefill_tokens=[0, 500, 300])
    assert policy.choose(feats([*blocks, 1000]), replicas) == 1
    assert policy.last_cached_tokens == 1600


def test_treadle_prefers_idle_replica_when_match_is_queued_too_long() -> None:
    policy = treadle()
    blocks = list(range(10))  # 160 tokens cached on replica 1
    policy.indexes[1].insert(chain_block_ids(blocks), now=0.0)
    replicas = states(3, pending_prefill_tokens=[400, 5000, 0])
    # replica 1: 5 s queue + 0.016 s; replica 2: 0 s + 0.176 s
    assert policy.choose(feats([*blocks, 77]), replicas) == 2
    assert policy.last_cached_tokens == 0


def test_treadle_session_affinity_and_stealing() -> None:
    policy = treadle(steal_delay_s=1.0, steal_factor=2.0)
    first = feats([1, 2], now=0.0, program_id="prog")
    home = policy.choose(first, states(3))
    # the program's next call shares nothing with its first, yet goes home while home is
    # not overloaded, even though another replica is idler
    busy_home = [0, 0, 0]
    busy_home[home] = 800  # 0.8 s of queue: under steal_delay_s
    assert (
        policy.choose(
            feats([5, 6], now=1.0, program_id="prog"), states(3, pending_prefill_tokens=busy_home)
        )
        == home
    )
    # home overloaded (3 s queue > 1 s and > 2x the idlest): another replica steals the work
    overloaded = [100, 100, 100]
    overloaded[home] = 3000
    thief = policy.choose(
        feats([5, 6, 7], now=2.0, program_id="prog"), states(3, pending_prefill_tokens=overloaded)
    )
    assert thief != home and policy.steals == 1
    # the program now lives where it was stolen to
    assert policy.affinity["prog"][0] == thief


def test_treadle_imbalance_guard() -> None:
    policy = treadle()
    blocks = list(range(50))
    policy.indexes[0].insert(chain_block_ids(blocks), now=0.0)
    assert policy.choose(feats(blocks), states(3, in_flight=[100, 20, 5])) == 2
    assert policy.guarded == 1


def test_treadle_failure_feedback_takes_back_the_assumed_cache() -> None:
    router = Router(treadle(2), ["a", "b"])
    ticket = router.route(feats([1, 2, 3], program_id="p"))
    policy = router.policy
    assert isinstance(policy, TreadleRoutingPolicy)
    assert policy.indexes[ticket.replica].match(chain_block_ids([1, 2, 3]), now=0.0) == 3
    router.finish(ticket, now=1.0, ok=False)
    assert policy.indexes[ticket.replica].match(chain_block_ids([1, 2, 3]), now=1.0) == 0
    assert "p" not in policy.affinity


def test_character_chunks_by_default_token_chunks_with_a_tokenizer() -> None:
    """Routing counts characters unless it is given a tokenizer: production routing never
    uses the simulator's, which a real server's tokens do not match."""
    system = Message(role="system", content="Shared instructions for every call. " * 30)
    a = LLMRequest(model="m", messages=[system, Message(role="user", content="alpha " * 40)])
    b = LLMRequest(model="m", messages=[system, Message(role="user", content="omega " * 40)])
    fa = RequestFeatures.from_request(a, chunk_tokens=16)
    fb = RequestFeatures.from_request(b, chunk_tokens=16)
    assert fa.prompt_tokens == len(prompt_text(a)) // 4
    assert fa.chunks[:10] == fb.chunks[:10] and fa.chunks[-1] != fb.chunks[-1]
    assert fa.chunks == chain_text_chunks(prompt_text(a), 16 * 4)

    wide = CharTokenEstimator(chars_per_token=8)
    fw = RequestFeatures.from_request(a, chunk_tokens=16, tokens=wide)
    assert fw.prompt_tokens == len(prompt_text(a)) // 8
    assert fw.chunks == chain_text_chunks(prompt_text(a), 16 * 8)

    ids = encode_chat(a.messages)
    fs = RequestFeatures.from_request(a, chunk_tokens=16, tokens=SIM_TOKENS)
    assert fs.prompt_tokens == len(ids)
    assert fs.chunks == chain_token_chunks(ids, 16)
    shared = RequestFeatures.from_request(b, chunk_tokens=16, tokens=SIM_TOKENS).chunks
    assert fs.chunks[:10] == shared[:10] and fs.chunks[-1] != shared[-1]


def test_production_routing_and_admission_do_not_load_the_simulator() -> None:
    code = (
        "import sys\n"
        "from treadle.backends.base import LLMRequest, Message\n"
        "from treadle.backends.dispatch.pool import ReplicaPool\n"
        "from treadle.backends.dispatch.routing import RequestFeatures\n"
        "from treadle.runtime.sched.admission import SchedulerAdmission\n"
        "r = LLMRequest(model='m', messages=[Message(role='user', content='hi ' * 99)])\n"
        "RequestFeatures.from_request(r)\n"
        "SchedulerAdmission()\n"
        "print(sorted(m for m in sys.modules if m.startswith('treadle.backends.sim')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_treadle_steal_never_returns_to_the_overloaded_home() -> None:
    policy = treadle(steal_delay_s=1.0, steal_factor=2.0)
    blocks = list(range(400))  # 6,400 tokens, cached at home: staying would be "cheaper"
    home = policy.choose(feats(blocks, now=0.0, program_id="p"), states(3))
    queued = [0, 0, 0]
    queued[home] = 2500  # 2.5 s of queue: overloaded, though the cached prompt saves 6.4 s
    thief = policy.choose(
        feats([*blocks, 9], now=1.0, program_id="p"), states(3, pending_prefill_tokens=queued)
    )
    assert thief != home and policy.steals == 1


def test_treadle_forgets_quiet_programs() -> None:
    policy = treadle(affinity_ttl_s=10.0)
    for i in range(1100):
        policy.choose(feats([i], now=float(i) / 1000, program_id=f"p{i}"), states(2))
    # pruned at 1,024 programs: only those seen in the last 10 s (all of them here) stay
    assert len(policy.affinity) == 1100
    for i in range(1100, 3200):
        policy.choose(feats([i], now=100.0 + i, program_id=f"p{i}"), states(2))
    assert len(policy.affinity) < 1100
