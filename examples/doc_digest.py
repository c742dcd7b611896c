"""Map/reduce over documents: summarise every incident report in parallel (read, then
summarise, as a subgraph per document), then merge the follow-ups into one digest.

    treadle run examples/doc_digest.yaml
    python examples/doc_digest.py     # prints the result
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel

from treadle import ITEM, Graph, InputSpec, step
from treadle.tools.files import make_read_file

DOCS = Path(__file__).parent / "data" / "docs"

#: reads files under the example's own folder only
read_doc = make_read_file(DOCS, name="read_doc")

MODELS = {
    "default": {
        "backend": "scripted",
        "rules": [
            {
                "match": "# Incident: ([^\\n]+).*?"
                "Mitigation: (.+?)\\.\\s+Follow-up: (.+?)\\.?\\s*$",
                "content": '{"title": "{groups[1]}", "summary": "Mitigated: {groups[2]}.", '
                '"follow_ups": ["{groups[3]}"]}',
            }
        ],
    }
}


class DocSummary(BaseModel):
    title: str
    summary: str
    follow_ups: list[str]


class Digest(BaseModel):
    documents: int
    titles: list[str]
    follow_ups: list[str]


def list_docs(pattern: str) -> list[str]:
    """Names of the documents to digest, in a stable order."""
    return sorted(p.name for p in DOCS.glob(pattern))


def digest(summaries: list[DocSummary]) -> Digest:
    return Digest(
        documents=len(summaries),
        titles=[s.title for s in summaries],
        follow_ups=[f for s in summaries for f in s.follow_ups],
    )


def summarize_doc() -> Graph:
    """The per-document program: read the file, then summarise it."""
    g = Graph("summarize_doc", inputs={"path": str}, models=MODELS)
    read = g.tool("read", read_doc, inputs={"path": g.input.path})
    summary = g.llm(
        "summarize",
        "Summarise this incident report:\n{text}",
        system="You write one-line incident summaries and list follow-ups.",
        output=DocSummary,
        inputs={"text": read.out.text},
    )
    g.output(summary=summary.out)
    return g


def collect(results: list[Any]) -> list[DocSummary]:
    """The summaries out of each document's subgraph result."""
    return [DocSummary.model_validate(r.summary) for r in results]


def build() -> Graph:
    g = Graph(
        "doc_digest",
        inputs={"pattern": InputSpec(str, "incident-*.md")},
        description="Summarise documents in parallel and merge their follow-ups.",
        models=MODELS,
    )
    docs = g.func("docs", list_docs, inputs={"pattern": g.input.pattern})
    each = g.map(
        "summaries",
        docs.out,
        step.subgraph(summarize_doc(), inputs={"path": ITEM}),
        reduce=collect,
        concurrency=3,
    )
    g.output(digest=g.func("digest", digest, inputs={"summaries": each}).out)
    return g


graph = build()

if __name__ == "__main__":  # python examples/doc_digest.py
    from treadle.examples import run_and_print

    run_and_print(graph)
