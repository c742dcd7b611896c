"""Any framework can use `treadle gateway`: the official `openai` client and a LangGraph
graph with LangChain's `ChatOpenAI`, both pointed at the gateway's base URL.

    treadle sim serve --replicas 2 --port 8001 --model sim-small &
    treadle gateway --replica http://127.0.0.1:8001/v1 --replica http://127.0.0.1:8002/v1 \
        --dialect sim --model sim-small --tenant acme=2 --tenant globex=1 &
    python -m treadle.examples.gateway_clients --url http://127.0.0.1:9000/v1

Each agent names its program (a session) and its tenant: the `openai` client in
`extra_body={"treadle": {...}}`, LangChain in headers (`X-Session-Id`, `X-Treadle-Tenant`),
which any client can set. The gateway keeps each session on one replica (its prefix stays
cached there) and shares the replicas between tenants by weight.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

SYSTEM = "You are a travel planner. Answer in one short paragraph. " * 8


async def openai_agent(url: str, model: str, tenant: str, program: str, turns: int = 3) -> str:
    """A multi-turn conversation with the official client, hints in the body."""
    import openai

    async with openai.AsyncOpenAI(base_url=url, api_key="unused") as client:
        messages: list[Any] = [{"role": "system", "content": SYSTEM}]
        answer = ""
        for turn in range(turns):
            messages.append({"role": "user", "content": f"Step {turn}: plan day {turn + 1}."})
            response = await client.chat.completions.create(
                model=model,
                messages=messages,
                max_tokens=16,
                extra_body={
                    "treadle": {
                        "program_id": program,
                        "tenant": tenant,
                        "steps_to_execution": turns - turn - 1,
                        "last_llm_step": turn == turns - 1,
                    }
                },
            )
            answer = response.choices[0].message.content or ""
            messages.append({"role": "assistant", "content": answer})
        return answer


def langgraph_agent(url: str, model: str, tenant: str, session: str) -> Any:
    """A two-step LangGraph graph (draft, then refine) over `ChatOpenAI`, hints in headers."""
    from langchain_core.messages import HumanMessage, SystemMessage
    from langchain_openai import ChatOpenAI
    from langgraph.graph import END, START, MessagesState, StateGraph

    llm = ChatOpenAI(
        model=model,
        base_url=url,
        api_key="unused",
        max_completion_tokens=16,
        default_headers={"X-Session-Id": session, "X-Treadle-Tenant": tenant},
    )

    async def draft(state: MessagesState) -> dict[str, Any]:
        messages = [SystemMessage(SYSTEM), *state["messages"]]
        return {"messages": [await llm.ainvoke(messages)]}

    async def refine(state: MessagesState) -> dict[str, Any]:
        messages = [SystemMessage(SYSTEM), *state["messages"], HumanMessage("Make it shorter.")]
        return {"messages": [await llm.ainvoke(messages)]}

    graph = StateGraph(MessagesState)
    graph.add_node("draft", draft)
    graph.add_node("refine", refine)
    graph.add_edge(START, "draft")
    graph.add_edge("draft", "refine")
    graph.add_edge("refine", END)
    return graph.compile()


async def main(url: str, model: str) -> None:
    from langchain_core.messages import HumanMessage

    graph = langgraph_agent(url, model, "globex", "langgraph-1")
    state, answer = await asyncio.gather(
        graph.ainvoke({"messages": [HumanMessage("Plan a weekend in Lisbon.")]}),
        openai_agent(url, model, "acme", "openai-1"),
    )
    print("langgraph:", state["messages"][-1].content)
    print("openai:   ", answer)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:9000/v1")
    parser.add_argument("--model", default="sim-small")
    args = parser.parse_args()
    asyncio.run(main(args.url, args.model))
