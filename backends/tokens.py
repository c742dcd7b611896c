"""How many tokens a prompt is before a backend says: one `TokenEstimator` interface.

Prefix routing (`backends.dispatch`), the scheduler's admission (`runtime.sched`) and the
scripted backend's usage all count tokens before any server has; each takes an estimator as
a parameter, and `CHARS` (about four characters per token, the usual English estimate) is
the default. An estimator that has the engine's tokenizer also gives token ids
(`token_ids`): prefix routing then hashes chunks of real tokens, exactly the blocks the
engine caches. The simulator's tokenizer is one (`treadle.backends.sim.tokenizer.SIM_TOKENS`),
for simulated replicas only: a real server's tokens are not the simulator's.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from treadle.backends.base import LLMRequest


@runtime_checkable
class TokenEstimator(Protocol):
    """Token counts of text and prompts, before a backend reports the real ones."""

    @property
    def chars_per_token(self) -> int:
        """Average characters per token: prefix routing cuts a prompt it has no token ids
        for into chunks of `chunk_tokens * chars_per_token` characters."""
        ...

    def count(self, text: str) -> int:
        """About how many tokens `text` is."""
        ...

    def token_ids(self, request: LLMRequest) -> Sequence[int] | None:
        """The request's prompt as the engine's token ids; None when this estimator only
        counts (it has no tokenizer)."""
        ...


@dataclass(frozen=True)
class CharTokenEstimator:
    """`chars_per_token` characters make a token; no token ids."""

    chars_per_token: int = 4

    def __post_init__(self) -> None:
        if self.chars_per_token < 1:
            raise ValueError(f"chars_per_token must be >= 1, got {self.chars_per_token}")

    def count(self, text: str) -> int:
        return max(1, len(text) // self.chars_per_token) if text else 0

    def token_ids(self, request: LLMRequest) -> Sequence[int] | None:
        return None


#: the default estimator: four characters per token
CHARS = CharTokenEstimator()


def prompt_text(request: LLMRequest) -> str:
    """The request as the text an engine would see first: tools, then messages in order.

    The exact chat template does not matter for counting or routing, only that equal
    conversation prefixes give equal text prefixes, which this rendering preserves."""
    parts: list[str] = []
    if request.tools:
        parts.append(json.dumps(request.tools, sort_keys=True, separators=(",", ":")))
    for message in request.messages:
        parts.append(f"<|{message.role}|>{message.content or ''}")
        for call in message.tool_calls:
            parts.append(f"<|call|>{call.name}{call.arguments}")
    return "\n".join(parts)


def estimate_prompt_tokens(request: LLMRequest, tokens: TokenEstimator = CHARS) -> int:
    """About how many prompt tokens `request` is (at least 1)."""
    ids = tokens.token_ids(request)
    n = len(ids) if ids is not None else tokens.count(prompt_text(request))
    return max(1, n)
