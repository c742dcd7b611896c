"""Text-to-SQL: draft a query from the schema, validate it against the database, repair it
when it is wrong, run it, and answer.

    treadle run examples/text_to_sql.yaml
    python examples/text_to_sql.py     # prints the result
"""

from __future__ import annotations

import sqlite3
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from treadle import Graph, InputSpec, first_of, tool

SCRIPT = Path(__file__).parent / "data" / "sql" / "shop.sql"

SYSTEM = "You translate questions into SQLite SELECT statements."

MODELS = {
    "default": {
        "backend": "scripted",
        "rules": [
            {
                # the first draft uses a column that does not exist, as real drafts do
                "match": "Write one SQLite query answering: ([^\\n]+)",
                "content": '{"sql": "SELECT c.country, SUM(o.quantity * p.unit_price) AS '
                "revenue FROM orders o JOIN customers c ON c.id = o.customer_id JOIN "
                'products p ON p.id = o.product_id GROUP BY c.country ORDER BY revenue DESC"}',
            },
            {
                "match": "failed: no such column: p.unit_price",
                "content": '{"sql": "SELECT c.country, SUM(o.quantity * p.price) AS revenue '
                "FROM orders o JOIN customers c ON c.id = o.customer_id JOIN products p ON "
                'p.id = o.product_id GROUP BY c.country ORDER BY revenue DESC"}',
            },
        ],
    }
}


class Database(BaseModel):
    path: str
    schema_sql: str


class SQLQuery(BaseModel):
    sql: str


class Check(BaseModel):
    valid: bool
    error: str = ""


class QueryResult(BaseModel):
    sql: str
    columns: list[str]
    rows: list[list[Any]]


class Answer(BaseModel):
    question: str
    sql: str
    answer: str


def open_database(path: str) -> Database:
    """The example shop database (created from its SQL script on first use)."""
    db = Path(path) if path else Path(tempfile.gettempdir()) / "treadle-example-shop.db"
    if not db.exists():
        with sqlite3.connect(db) as conn:
            conn.executescript(SCRIPT.read_text())
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table'").fetchall()
    return Database(path=str(db), schema_sql="\n".join(r[0] for r in rows))


def validate_sql(db: Database, query: SQLQuery) -> Check:
    """Ask SQLite to plan the query without running it; only SELECTs are allowed."""
    if not query.sql.lstrip().lower().startswith(("select", "with")):
        return Check(valid=False, error="only SELECT queries may run")
    try:
        with sqlite3.connect(f"file:{db.path}?mode=ro", uri=True) as conn:
            conn.execute(f"EXPLAIN {query.sql}")
    except sqlite3.Error as exc:
        return Check(valid=False, error=str(exc))
    return Check(valid=True)


@tool(expected_duration_s=0.01, timeout_s=10)
def execute_sql(db_path: str, sql: str) -> QueryResult:
    """Run a read-only SQL query on the database.

    Args:
        db_path: The SQLite database file.
        sql: A SELECT statement.
    """
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as conn:
        cursor = conn.execute(sql)
        columns = [d[0] for d in cursor.description]
        rows = [list(r) for r in cursor.fetchall()]
    return QueryResult(sql=sql, columns=columns, rows=rows)


def answer(question: str, result: QueryResult) -> Answer:
    lines = [
        ", ".join(f"{c}={v}" for c, v in zip(result.columns, row, strict=True))
        for row in result.rows
    ]
    return Answer(question=question, sql=result.sql, answer="; ".join(lines) or "no rows")


def build() -> Graph:
    g = Graph(
        "text_to_sql",
        inputs={
            "question": InputSpec(str, "What is the revenue per country?"),
            "database": InputSpec(str, ""),
        },
        description="Draft, validate, repair and run a SQL query.",
        models=MODELS,
    )
    db = g.func("db", open_database, inputs={"path": g.input.database})
    draft = g.llm(
        "draft",
        "Write one SQLite query answering: {question}\nSchema:\n{schema}",
        system=SYSTEM,
        output=SQLQuery,
        inputs={"question": g.input.question, "schema": db.out.schema_sql},
    )
    check = g.func("check", validate_sql, inputs={"db": db, "query": draft})
    g.branch(
        "valid",
        {"true": ["execute"], "false": ["repair", "execute_repaired"]},
        inputs={"ok": check.out.valid},
    )
    execute = g.tool(
        "execute", execute_sql, inputs={"db_path": db.out.path, "sql": draft.out.sql}, retries=2
    )
    repair = g.llm(
        "repair",
        "The query\n{sql}\nfailed: {error}\nSchema:\n{schema}\nWrite a corrected query.",
        system=SYSTEM,
        output=SQLQuery,
        inputs={"sql": draft.out.sql, "error": check.out.error, "schema": db.out.schema_sql},
    )
    repaired = g.tool(
        "execute_repaired",
        execute_sql,
        inputs={"db_path": db.out.path, "sql": repair.out.sql},
        retries=2,
    )
    final = g.func(
        "answer",
        answer,
        inputs={"question": g.input.question, "result": first_of(execute.out, repaired.out)},
    )
    g.output(answer=final.out)
    return g


graph = build()

if __name__ == "__main__":  # python examples/text_to_sql.py
    from treadle.examples import run_and_print

    run_and_print(graph)
