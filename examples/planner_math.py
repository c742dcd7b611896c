"""Planner over real tools: value the stock of two warehouses from their files.

The planner writes an LLMCompiler-style plan — read both files in parallel, value each
warehouse as soon as its file is read, add the two values — and treadle dispatches each
task the moment its line has streamed and its inputs are ready. The joiner turns the
observations into a typed `StockValue`. The embedded scripted model makes it run offline.

    treadle run examples/planner_math.yaml              # the same program as a workflow file
    python examples/planner_math.py                     # prints the result
    treadle run treadle.examples.planner_math:graph     # this module
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from treadle import Graph, InputSpec
from treadle.tools import calculator, make_read_file

DATA = Path(__file__).parent / "data" / "planner"

#: `read_file` confined to the example's data folder
read_data = make_read_file(DATA)

QUESTION = "What is the total value at cost of the stock in the north and south warehouses?"

PLAN = (
    "Thought: Read both warehouse files, value each stock, then add the two values.\n"
    '1. read_file("north.json")\n'
    '2. read_file("south.json")\n'
    '3. calculator("${1.text.units} * ${1.text.unit_cost}")\n'
    '4. calculator("${2.text.units} * ${2.text.unit_cost}")\n'
    '5. calculator("$3 + $4")\n'
    "6. join()<END_OF_PLAN>"
)

#: the embedded default model: a realistic plan, and a joiner that reads the observations
MODELS = {
    "default": {
        "backend": "scripted",
        "rules": [
            {
                # the joiner: its message holds the executed plan with observations
                "match": r"Observation: ([\d.]+)\n4\. .*Observation: ([\d.]+)\n5\. .*"
                r"Observation: ([\d.]+)",
                "content": "Thought: Task 5 added the two warehouse values.\n"
                'Action: Finish({"total": {groups[3]}, "by_warehouse": '
                '{"north": {groups[1]}, "south": {groups[2]}}, "currency": "USD"})',
            },
            {"match": "total value", "content": PLAN},
        ],
    }
}


class StockValue(BaseModel):
    total: float
    by_warehouse: dict[str, float]
    currency: str


def build() -> Graph:
    g = Graph(
        "planner_math",
        inputs={"question": InputSpec(str, QUESTION)},
        description="Plan file reads and arithmetic; run them in parallel as the plan streams.",
        models=MODELS,
    )
    plan = g.planner(
        "value",
        "{question}",
        tools=[read_data, calculator],
        system="Warehouse files are JSON with `units` and `unit_cost`; value = units * cost.",
        output=StockValue,
        max_replans=1,
        inputs={"question": g.input.question},
    )
    g.output(value=plan.out)
    return g


graph = build()

if __name__ == "__main__":  # python examples/planner_math.py
    from treadle.examples import run_and_print

    run_and_print(graph)
