"""The official `openai` client and a LangGraph graph over LangChain's `ChatOpenAI` use
`treadle gateway` by its base URL: each agent keeps its replica (prefix-aware dispatch by
program), and each tenant's service is counted for its fair share."""

from __future__ import annotations

from collections import defaultdict

import anyio
import pytest
from gateway_support import MODEL, gateway_over, replicas

from treadle.examples.gateway_clients import langgraph_agent, openai_agent

pytestmark = pytest.mark.anyio


async def test_openai_and_langgraph_agents_share_the_gateway() -> None:
    from langchain_core.messages import HumanMessage

    async with (
        replicas(2) as sims,
        gateway_over(sims.urls, tenants={"acme": 2, "globex": 1}) as (svc, url),
    ):
        states: list[dict[str, object]] = []
        answers: list[str] = []

        async def run_graph(session: str) -> None:
            graph = langgraph_agent(url, MODEL, "globex", session)
            states.append(
                await graph.ainvoke({"messages": [HumanMessage(f"Plan {session} in Lisbon.")]})
            )

        async def run_openai(program: str) -> None:
            answers.append(await openai_agent(url, MODEL, "acme", program, turns=3))

        async with anyio.create_task_group() as tg:
            for i in range(2):
                tg.start_soon(run_graph, f"lg-{i}")
                tg.start_soon(run_openai, f"oa-{i}")
        assert len(states) == 2 and all(answers)
        # which replica served each program: the gateway's request ids start with it
        served: dict[str, set[int]] = defaultdict(set)
        for i, recorded in enumerate(sims.recorded):
            for headers in recorded.headers:
                served[headers["x-request-id"].split("#")[0]].add(i)
        assert set(served) == {"lg-0", "lg-1", "oa-0", "oa-1"}
        assert all(len(replicas_used) == 1 for replicas_used in served.values())
        service = svc.gateway.scheduler.service_by_tenant()
        assert service["acme"] > 0 and service["globex"] > 0
        sched = svc.gateway.scheduler.scheduler
        assert (sched.tenants["acme"].weight, sched.tenants["globex"].weight) == (2, 1)
        # the openai agents said which call was their last: their programs are closed
        assert {"oa-0", "oa-1"}.isdisjoint(svc.gateway.scheduler.programs)
