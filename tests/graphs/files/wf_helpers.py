"""Functions, tools and types that the sample workflow files name by import path.

The loader finds this module through the workflow file's folder (it is not on sys.path).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from treadle.tools import tool


class Queries(BaseModel):
    """Search queries an LLM proposes."""

    queries: list[str]


@tool
def search_docs(query: str, top_k: int = 3) -> list[dict[str, Any]]:
    """Search the local documents.

    Args:
        query: what to look for
        top_k: how many hits to return
    """
    return [{"query": query, "rank": i} for i in range(top_k)]


@tool
def lookup(term: str) -> str:
    """Look a term up in the glossary."""
    return term.upper()


def merge_hits(results: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return [hit for hits in results for hit in hits]


def repair_text(text: str) -> str:
    return text.strip()


def format_answer(summary: str, question: str) -> str:
    return f"{question}: {summary}"


def choose(ok: bool) -> str:
    return "true" if ok else "false"


not_a_tool = merge_hits
NOT_CALLABLE = 42
