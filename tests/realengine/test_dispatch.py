"""The dispatch pool over three real `llama-server`s: prefix-aware routing measured by the
servers' own `cached_tokens`, and a server killed in the middle of a call."""

from __future__ import annotations

from collections import defaultdict

import anyio
import httpx
import pytest
from realengine_support import StartServers

from treadle.backends.base import LLMRequest, Message
from treadle.backends.dispatch.pool import ReplicaPool
from treadle.backends.openai_compat.llamacpp import LlamaCppBackend
from treadle.testing.llamacpp import MODEL_ALIAS, LlamaServers

pytestmark = pytest.mark.anyio

#: two agents' long system prompts; each request shares one of them
PREFIXES = [f"You are agent {name}. " + f"Rule for {name}: be precise. " * 60 for name in "AB"]


def request(prefix: str, i: int, **kw: object) -> LLMRequest:
    messages = [Message(role="system", content=prefix), Message(role="user", content=f"task {i}")]
    return LLMRequest.model_validate(
        {"model": "alias", "messages": messages, "max_tokens": 8, "temperature": 0.0, **kw}
    )


def pool(servers: LlamaServers, policy: str, **dialect: object) -> ReplicaPool:
    replicas = [
        LlamaCppBackend(s.url, MODEL_ALIAS, retries=0, dialect_options=dialect) for s in servers
    ]
    return ReplicaPool(replicas, policy=policy, names=[f"s{i}" for i in range(len(servers))])


async def test_prefix_aware_routing_keeps_each_prefix_on_one_server(
    start_servers: StartServers,
) -> None:
    cached: dict[str, int] = {}
    for policy in ("round_robin", "treadle"):
        servers = start_servers(3)
        replicas_of: dict[int, set[str]] = defaultdict(set)
        total = 0
        async with pool(servers, policy) as p:
            for i in range(8):
                group = i % 2
                answer = await p.generate(request(PREFIXES[group], i))
                replicas_of[group].add(answer.replica or "")
                total += answer.usage.cached_prompt_tokens
        cached[policy] = total
        if policy == "treadle":
            assert all(len(names) == 1 for names in replicas_of.values()), replicas_of
        servers.stop()
    # round robin scatters each prefix over the three servers and recomputes it there
    assert cached["treadle"] > cached["round_robin"]


async def test_a_server_killed_mid_call_is_retried_on_another(
    start_servers: StartServers,
) -> None:
    servers = start_servers(3)
    # ignore_eos: the first try runs until the server is killed
    async with pool(servers, "round_robin", extra_body={"ignore_eos": True}) as p:
        victim = servers[0]  # round robin sends the first request there

        async def kill_when_busy() -> None:
            async with httpx.AsyncClient() as client:
                while True:
                    states = (await client.get(victim.url + "/slots")).json()
                    if any(s["is_processing"] for s in states):
                        break
                    await anyio.sleep(0.01)
            victim.kill()

        async with anyio.create_task_group() as tg:
            tg.start_soon(kill_when_busy)
            answer = await p.generate(request(PREFIXES[0], 0, max_tokens=3000))
        assert answer.replica in ("s1", "s2")
        status = {s.name: s for s in p.status()}
        assert status["s0"].consecutive_failures == 1
