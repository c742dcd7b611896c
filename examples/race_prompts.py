"""A race between two prompts: ask for a quick answer and a worked answer at once, take
whichever finishes first, and cancel the other (its generation is aborted in the engine,
so it costs nothing more). The output says which prompt won.

    treadle run examples/race_prompts.yaml
    treadle run treadle.examples.race_prompts:graph

The model is the GPU engine simulator (`sim`), offline: a longer answer takes longer to
decode, as on a real engine.
"""

from __future__ import annotations

from treadle import Graph, InputSpec, step

#: the embedded default model: the engine simulator with scripted answers (runs offline)
MODELS = {
    "default": {
        "backend": "sim",
        "speed": 20.0,
        "rules": [
            {"match": "one sentence", "content": "Keep the KV cache of idle agents pinned."},
            {
                "match": "step by step",
                "content": (
                    "Step 1: find out what the agent waits for: a tool, a person, or the model. "
                    "Step 2: measure how long each tool takes, and how often it is called. "
                    "Step 3: keep the KV cache of an agent pinned while a short tool runs. "
                    "Step 4: release the pin when the tool is slow, because memory is worth more. "
                    "Step 5: order the calls of one program together, so its prefix stays warm. "
                    "Step 6: route calls that share a prefix to the replica that holds it. "
                    "Step 7: batch the decode steps of many agents at every iteration. "
                    "Step 8: watch the engine's memory pressure and shed pins before it preempts. "
                    "Step 9: retry a failed call elsewhere, never on the replica that failed. "
                    "Step 10: trace every call, so the slow step shows on the critical path."
                ),
            },
        ],
    }
}


def build() -> Graph:
    g = Graph(
        "race_prompts",
        inputs={"question": InputSpec(str, "How do I keep agents fast while tools run?")},
        description="Two prompts race; the first answer wins, the other is cancelled.",
        models=MODELS,
    )
    answer = g.race(
        "answer",
        {
            "quick": step.llm("Answer in one sentence: {q}", inputs={"q": g.input.question}),
            "worked": step.llm(
                "Answer step by step: {q}", inputs={"q": g.input.question}, max_tokens=2048
            ),
        },
    )
    g.output(winner=answer.out.winner, answer=answer.out.output)
    return g


graph = build()
