"""`SimRequest`: one request to the simulated engine, and the record of what happened to it.

The input fields are set by the caller; the engine fills the record (arrival, first token,
finish, cached and recomputed tokens, preemptions) and keeps its own bookkeeping in the
underscored slots (`engine.py` owns those). The states are module constants so that the
engine's hot paths compare small ints.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

from treadle.backends.sim.blocks import Prompt
from treadle.backends.sim.kvcache import CacheEntry

NEW, WAITING, PREFILL, DECODE, FINISHED = range(5)
_STATE_NAMES = {NEW: "new", WAITING: "waiting", PREFILL: "prefill", DECODE: "decode"}
_STATE_NAMES[FINISHED] = "finished"

RequestCallback = Callable[["SimRequest"], None]


class SimRequest:
    """A request to the simulated engine, and the record of what happened to it."""

    __slots__ = (
        "_L0",
        "_S0",
        "_computed",
        "_dec_c",
        "_dec_epoch",
        "_ends",
        "_g0",
        "_held",
        "_held_blocks",
        "_keys",
        "_n_held",
        "_private",
        "_reported",
        "_seq",
        "_sort_key",
        "_target",
        "_wait_epoch",
        "_watermark",
        "aborted",
        "arrival_time",
        "cached_tokens",
        "finish_time",
        "first_token_time",
        "is_last_step",
        "num_preemptions",
        "on_finish",
        "on_first_token",
        "on_token",
        "output_len",
        "output_tokens",
        "pin_ttl_s",
        "priority",
        "program_id",
        "prompt",
        "prompt_tokens",
        "recomputed_tokens",
        "replica",
        "request_id",
        "sequence",
        "state",
        "tag",
    )

    _ids = itertools.count()

    def __init__(
        self,
        prompt: Prompt,
        output_len: int | None = None,
        *,
        output_tokens: list[int] | tuple[int, ...] | None = None,
        output_key: Any = None,
        request_id: str | None = None,
        priority: int = 0,
        program_id: str | None = None,
        pin_ttl_s: float | None = None,
        is_last_step: bool = False,
        on_first_token: RequestCallback | None = None,
        on_token: RequestCallback | None = None,
        on_finish: RequestCallback | None = None,
        tag: Any = None,
    ):
        """`output_len` tokens will be generated (or `len(output_tokens)`).

        Identity of the output for the prefix cache (optional): `output_tokens` (the ids the
        model generates, for token prompts) or `output_key` (a segment key, for segment
        prompts); without either, output blocks are never shared.
        """
        if output_tokens is not None:
            if output_len is not None and output_len != len(output_tokens):
                raise ValueError("output_len disagrees with len(output_tokens)")
            output_len = len(output_tokens)
        if output_len is None or output_len < 1:
            raise ValueError("a request must generate at least one token (output_len >= 1)")
        if prompt.num_tokens < 1:
            raise ValueError("a request needs a prompt of at least one token")
        if pin_ttl_s is not None and not (0 < pin_ttl_s < math.inf):
            raise ValueError("pin_ttl_s must be a positive, finite number of seconds")
        if output_tokens is not None:
            sequence = prompt.extend_tokens(output_tokens)
        elif output_key is not None:
            sequence = prompt.extend_segments([(output_key, output_len)])
        else:
            sequence = prompt
        self.prompt = prompt
        self.sequence = sequence
        self.prompt_tokens = prompt.num_tokens
        self.output_len = output_len
        self.request_id = request_id if request_id is not None else f"simreq-{next(self._ids)}"
        self.priority = priority
        self.program_id = program_id
        self.pin_ttl_s = pin_ttl_s
        self.is_last_step = is_last_step
        self.on_first_token = on_first_token
        self.on_token = on_token
        self.on_finish = on_finish
        self.tag = tag
        # the record
        self.state = NEW
        self.replica: str | None = None
        self.arrival_time = math.nan
        self.first_token_time: float | None = None
        self.finish_time: float | None = None
        self.cached_tokens: int | None = None
        self.recomputed_tokens = 0
        self.output_tokens = 0
        self.num_preemptions = 0
        self.aborted = False
        # engine state
        self._keys = sequence.keys
        self._ends = sequence.ends
        self._seq = 0
        self._sort_key: tuple[float, ...] = ()
        self._target = prompt.num_tokens
        self._computed = 0
        self._held: list[CacheEntry] = []
        self._n_held = 0
        self._held_blocks = 0
        self._private = 0
        self._watermark = 0
        self._wait_epoch = 0
        self._dec_epoch = 0
        self._dec_c = 0
        self._L0 = 0
        self._g0 = 0
        self._S0 = 0
        self._reported = 0

    @property
    def finished(self) -> bool:
        return self.state == FINISHED

    @property
    def status(self) -> str:
        return _STATE_NAMES[self.state]

    @property
    def ttft(self) -> float | None:
        """Seconds from arrival to the first output token."""
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def latency(self) -> float | None:
        """Seconds from arrival to the last output token."""
        if self.finish_time is None:
            return None
        return self.finish_time - self.arrival_time

    def __repr__(self) -> str:
        return (
            f"SimRequest({self.request_id}, {self.status}, prompt={self.prompt_tokens}, "
            f"out={self.output_tokens}/{self.output_len})"
        )
