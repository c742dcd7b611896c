"""Research agent: plan search queries, search a local corpus in parallel, summarise with
sources.

    treadle run examples/research.yaml            # the same program as a workflow file
    python examples/research.py                   # prints the result
    treadle run treadle.examples.research:graph   # this module
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel

from treadle import ITEM, Graph, InputSpec, step, tool

CORPUS = Path(__file__).parent / "data" / "research"

SYSTEM = "You are a research assistant for engineers who run LLM agents in production."

#: the embedded default model: deterministic answers, so the example runs offline
MODELS = {
    "default": {
        "backend": "scripted",
        "rules": [
            {
                "match": "search queries for: (.+)",
                "content": '{"queries": ["continuous batching", "prefix caching", '
                '"KV cache eviction for agents"]}',
            },
            {
                "match": "Question: ([^\\n]+)",
                "content": '{"summary": "{groups[1]} Engines batch at every decoding step, '
                "reuse the KV cache of shared prompt prefixes, and evict idle context "
                'least-recently-used first, which is what hurts agents while tools run."}',
            },
        ],
    }
}


class Queries(BaseModel):
    queries: list[str]


class Hit(BaseModel):
    source: str
    score: float
    excerpt: str


class Summary(BaseModel):
    summary: str


class Report(BaseModel):
    summary: str
    sources: list[str]


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


@tool(expected_duration_s=0.02, timeout_s=5, max_concurrency=8)
def search_docs(query: str, top_k: int = 2) -> list[Hit]:
    """Search the research notes for a query.

    Args:
        query: Words to look for.
        top_k: How many notes to return, best first.
    """
    terms = set(_words(query))
    hits = []
    for path in sorted(CORPUS.glob("*.md")):
        text = path.read_text()
        words = _words(text)
        score = sum(words.count(t) for t in terms) / max(len(words), 1) * 100
        if score > 0:
            sentences = re.split(r"(?<=[.!?])\s+", text.split("\n", 2)[-1])
            best = max(sentences, key=lambda s: sum(t in s.lower() for t in terms))
            hits.append(Hit(source=path.name, score=round(score, 3), excerpt=best.strip()))
    hits.sort(key=lambda h: -h.score)
    return hits[:top_k]


def merge_hits(batches: list[list[Hit]]) -> list[Hit]:
    """One list of hits, each source once with its best score."""
    best: dict[str, Hit] = {}
    for batch in batches:
        for hit in batch:
            if hit.source not in best or hit.score > best[hit.source].score:
                best[hit.source] = hit
    return sorted(best.values(), key=lambda h: -h.score)


def cite(summary: Summary, hits: list[Hit]) -> Report:
    return Report(summary=summary.summary, sources=[h.source for h in hits])


def build() -> Graph:
    g = Graph(
        "research",
        inputs={"question": InputSpec(str, "How do serving engines make LLM agents fast?")},
        description="Plan queries, search in parallel, summarise with sources.",
        models=MODELS,
    )
    plan = g.llm(
        "plan",
        "Write three search queries for: {question}",
        system=SYSTEM,
        output=Queries,
        inputs={"question": g.input.question},
    )
    search = g.map(
        "search",
        plan.out.queries,
        step.tool(search_docs, inputs={"query": ITEM, "top_k": 2}),
        reduce=merge_hits,
        concurrency=4,
    )
    summarize = g.llm(
        "summarize",
        "Question: {question}\nNotes:\n{hits}\nWrite a short answer grounded in the notes.",
        system=SYSTEM,
        output=Summary,
        inputs={"question": g.input.question, "hits": search},
        retries=1,
    )
    report = g.func("cite", cite, inputs={"summary": summarize, "hits": search})
    g.output(report=report.out)
    return g


graph = build()

if __name__ == "__main__":  # python examples/research.py
    from treadle.examples import run_and_print

    run_and_print(graph)
