"""A deterministic stand-in tokenizer, so the simulator can count and hash tokens offline.

It is not a real BPE vocabulary; it only has to behave like one where the simulator looks:

- **Length**: English prose comes out at about 4 characters per token (Llama-3's tokenizer
  gives 4 to 4.5). Text is cut into pieces the way GPT-style pre-tokenizers do (a word with
  its leading space, a run of up to 3 digits, a run of punctuation, whitespace); a piece of
  up to 7 characters is one token and longer pieces are cut into 5-character chunks.
- **Ids**: each chunk's id is CRC-32 of its UTF-8 bytes mapped into [0, 128000), the size
  of Llama-3's ordinary vocabulary; ids 128000-128255 are the special tokens below. Equal
  text always gives equal ids, in every process (no salted hashing).
- **Prefix stability**: a text's tokens are the concatenation of its pieces' tokens, so two
  texts that agree up to a piece boundary (the end of a word, number or punctuation run
  that is followed by a space or a newline) agree on their tokens up to that point. The
  chat template tokenizes every message on its own, so requests whose messages agree on a
  prefix of messages agree on a prefix of tokens, which is what prefix caching needs.

Public API (stable):

    tokenize(text) -> list[int]
    tokenize_with_offsets(text) -> (ids, ends)     # ends[i]: character end of token i
    encode_chat(messages, tools=None, add_generation_prompt=True) -> list[int]
    encode_completion(content, tool_calls=()) -> list[int]   # what the model generates
    completion_text_ends(content) -> list[int]      # char offsets for streaming `content`
    SIM_TOKENS                                      # it as a `TokenEstimator`, for routing
    VOCAB_SIZE, BOS, EOT, ...

The chat template follows Llama-3's layout: `<|begin_of_text|>`, then per message
`<|start_header_id|>ROLE<|end_header_id|>` + "\n\n" + content + `<|eot_id|>`; tools are
listed as JSON in a leading system header; an assistant's tool calls are rendered as
`<|python_tag|>` + one JSON object per call. `encode_completion(c, calls)` is exactly the
token run that the assistant message `(c, calls)` contributes after its header, so a
request's prompt plus its generated tokens is a token-prefix of the next turn's prompt.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from treadle.backends.base import LLMRequest, Message, ToolCall

VOCAB_SIZE = 128256
ORDINARY_VOCAB = 128000
BOS = 128000  # <|begin_of_text|>
START_HEADER = 128006  # <|start_header_id|>
END_HEADER = 128007  # <|end_header_id|>
EOM = 128008  # <|eom_id|>
EOT = 128009  # <|eot_id|>
PYTHON_TAG = 128010  # <|python_tag|>

_PIECE = re.compile(
    r"""'(?:[sdmt]|ll|ve|re)| ?[^\W\d_]+| ?\d{1,3}| ?[^\s\w]+|\s+(?!\S)|\s+""",
    re.UNICODE,
)
_WHOLE = 7  # a piece this long or shorter is one token
_CHUNK = 5  # longer pieces are cut into chunks of this many characters


def _token_id(chunk: str) -> int:
    return zlib.crc32(chunk.encode("utf-8")) % ORDINARY_VOCAB


def tokenize_with_offsets(text: str) -> tuple[list[int], list[int]]:
    """Token ids and, for each token, the end offset of its characters in `text`."""
    ids: list[int] = []
    ends: list[int] = []
    for m in _PIECE.finditer(text):
        start, end = m.span()
        if end - start <= _WHOLE:
            ids.append(_token_id(m.group()))
            ends.append(end)
            continue
        for i in range(start, end, _CHUNK):
            j = min(i + _CHUNK, end)
            ids.append(_token_id(text[i:j]))
            ends.append(j)
    return ids, ends


def tokenize(text: str) -> list[int]:
    """Token ids for `text` (see the module docstring for the guarantees)."""
    return tokenize_with_offsets(text)[0]


def _role_header(role: str) -> list[int]:
    return [START_HEADER, *tokenize(role), END_HEADER, *tokenize("\n\n")]


def _as_message(m: Message | Mapping[str, Any]) -> Message:
    return m if isinstance(m, Message) else Message.model_validate(m)


def _tool_call_json(call: ToolCall) -> str:
    return json.dumps({"name": call.name, "parameters": call.arguments}, separators=(",", ":"))


def encode_completion(content: str | None, tool_calls: Sequence[ToolCall] = ()) -> list[int]:
    """The tokens a model generates for an answer: content, tool calls, then `<|eot_id|>`."""
    out = tokenize(content or "")
    for call in tool_calls:
        out.append(PYTHON_TAG)
        out.extend(tokenize(_tool_call_json(call)))
    out.append(EOT)
    return out


def completion_text_ends(content: str | None) -> list[int]:
    """For each content token of `encode_completion(content, ...)`, where its text ends."""
    return tokenize_with_offsets(content or "")[1]


def encode_chat(
    messages: Iterable[Message | Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    *,
    add_generation_prompt: bool = True,
) -> list[int]:
    """Tokens of a chat request under the fixed Llama-3-style template (module docstring)."""
    out = [BOS]
    if tools:
        out += _role_header("system")
        out += tokenize("Tools:\n" + json.dumps(list(tools), sort_keys=True))
        out.append(EOT)
    for raw in messages:
        m = _as_message(raw)
        role = "ipython" if m.role == "tool" else m.role
        out += _role_header(role)
        if m.role == "assistant":
            out += encode_completion(m.content, m.tool_calls)
            continue
        out += tokenize(m.content or "")
        out.append(EOT)
    if add_generation_prompt:
        out += _role_header("assistant")
    return out


@dataclass(frozen=True)
class SimTokenEstimator:
    """This tokenizer as a `TokenEstimator` (`treadle.backends.tokens`): exact counts and
    token ids for simulated replicas, so prefix routing hashes the very blocks they cache.
    Only for the simulator: a real server's tokens are not these."""

    chars_per_token: int = 4

    def count(self, text: str) -> int:
        return len(tokenize(text))

    def token_ids(self, request: LLMRequest) -> Sequence[int] | None:
        return encode_chat(request.messages, request.tools or None)


#: the simulator's tokenizer, for `ReplicaPool(tokens=...)` over simulated replicas
SIM_TOKENS = SimTokenEstimator()
