"""A tiny random-weight chat model as a GGUF file, written at test time, for `llama-server`.

No model is downloaded: `write_tiny_gguf(path)` writes a llama-architecture model (2 layers,
hidden 128, 4 query / 2 KV heads, feed-forward 256, context 16384, F32, about 0.55 M
parameters, 2.2 MB) with a byte-level BPE tokenizer (the 256 GPT-2 byte symbols, the
letter pairs and space+letter merges: 958 tokens, about two characters a token) and the
ChatML control tokens, `<tool_call>` / `</tool_call>` as single tokens, and a Hermes-style
ChatML chat template with tools (the layout of Qwen2.5's), so `llama-server` renders tool
definitions, parses `<tool_call>{...}</tool_call>` answers into OpenAI `tool_calls` and
applies `json_schema` grammars as it does for a real model.

The weights are random (seeded: the same file every time) with two deliberate structures,
carried by residual dimensions that no layer writes to (their rows of the attention output
and feed-forward down matrices are zero):

- a *unigram prior*: dimension 0 is 1.0 in every embedding, so after the final norm it is a
  steady positive value and column 0 of the output matrix acts as a per-token logit bias.
  It favours the end of turn, the JSON closers (`"`, `}`, `]`) and the space, so a
  grammar-constrained string closes within a few tokens: a random model's JSON parses.
- four *bigrams*, each stronger than any request's `logit_bias`: `<tool_call>` is followed
  by a newline (dimension 1; the server's lazy tool-call grammar triggers on
  `<tool_call>\n`), `"` by `"` (dimension 3), so a string that a grammar has just opened
  closes at once (JSON strings come out empty rather than full of the biased `<tool_call>`
  token), `}` by `</tool_call>` (dimension 4) and `</tool_call>` by the end of turn
  (dimension 2): one call per answer. With such a bias
  (`LlamaCppDialect(tool_call_bias=10)`) every answer offered tools is one well-formed
  tool call.

Output is deterministic gibberish under greedy decoding.

Needs the `gguf` package (MIT, from llama.cpp; in treadle's `dev` and `llamacpp` extras).
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from treadle.errors import SetupError

#: ChatML with tools, laid out as Qwen2.5's template (so llama.cpp's chat analyser finds the
#: `<tool_call>` JSON format). `tool_call.arguments` arrives as an object or a JSON string.
CHAT_TEMPLATE = """\
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}\
{{- 'You are a helpful assistant.' }}{%- endif %}
{{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\
\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
{%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
{{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and \
arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": \
<function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
{%- if messages[0]['role'] == 'system' %}\
{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- endif %}
{%- endif %}
{%- for message in messages %}
{%- if (message.role == "user") or (message.role == "system" and not loop.first) or \
(message.role == "assistant" and not message.tool_calls) %}
{{- '<|im_start|>' + message.role + '\\n' + (message.content or '') + '<|im_end|>' + '\\n' }}
{%- elif message.role == "assistant" %}
{{- '<|im_start|>' + message.role }}
{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
{%- for tool_call in message.tool_calls %}
{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
{{- '\\n<tool_call>\\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}
{%- if tool_call.arguments is string %}{{- tool_call.arguments }}\
{%- else %}{{- tool_call.arguments | tojson }}{%- endif %}
{{- '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == "tool" %}
{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}\
{{- '<|im_start|>user' }}{%- endif %}
{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}
{%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\
{{- '<|im_end|>\\n' }}{%- endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

END_OF_TEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
TOOL_CALL = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
#: a bigram's embedding value and output weight: its logit is about 80 after the norm
_BIGRAM_EMBED = 4.0
_BIGRAM_OUT = 8.0
#: residual dimensions no layer writes: the prior (0) and the bigrams (1-4)
_RESERVED = 5


@dataclass(frozen=True)
class TinyModel:
    """The shape of the tiny model (defaults: the one the tests use)."""

    layers: int = 2
    hidden: int = 128
    heads: int = 4
    kv_heads: int = 2
    feed_forward: int = 256
    context: int = 16384
    seed: int = 0
    #: logit bias (in logits) of the end of turn, the JSON closers and the space
    eos_bias: float = 2.2
    closer_bias: float = 2.6
    space_bias: float = 1.0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def parameters(self, vocab_size: int) -> int:
        """Weights, all tensors (embeddings and output included)."""
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        ffn = 3 * self.hidden * self.feed_forward
        per_layer = attn + ffn + 2 * self.hidden
        return 2 * vocab_size * self.hidden + self.layers * per_layer + self.hidden


#: the tests' model: fast enough that a test's requests take milliseconds
TINY = TinyModel()
#: the benchmarks' and calibration's model: about 3.5 M parameters, slow enough that the
#: engine's physics, not HTTP, dominates its timings on a CPU thread
SMALL = TinyModel(layers=4, hidden=256, heads=8, kv_heads=4, feed_forward=768)


@dataclass(frozen=True)
class TinyVocab:
    """The tokenizer: `tokens[i]` is token i's text in GPT-2's byte-to-unicode alphabet."""

    tokens: list[str]
    types: list[int]
    merges: list[str]

    def id(self, token: str) -> int:
        """The id of a control token or of a token's byte-level text."""
        return self.tokens.index(token)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (as in its `encoder.py`)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def tiny_vocab() -> TinyVocab:
    """256 byte tokens, 26 space+letter and 676 letter-pair merges, then 5 control tokens."""
    normal, control, user_defined = 1, 3, 4
    byte_map = _bytes_to_unicode()
    tokens = [byte_map[b] for b in range(256)]
    space = byte_map[ord(" ")]
    letters = string.ascii_lowercase
    pairs = [(space, c) for c in letters] + [(a, b) for a in letters for b in letters]
    merges = [f"{a} {b}" for a, b in pairs]
    tokens += [a + b for a, b in pairs]
    types = [normal] * len(tokens)
    # ChatML controls are CONTROL (not rendered in answers); the tool-call markers are
    # USER_DEFINED, as Qwen2.5's: rendered as text, so the server's tool-call parser sees them.
    for token, kind in (
        (END_OF_TEXT, control),
        (IM_START, control),
        (IM_END, control),
        (TOOL_CALL, user_defined),
        (TOOL_CALL_END, user_defined),
    ):
        tokens.append(token)
        types.append(kind)
    return TinyVocab(tokens=tokens, types=types, merges=merges)


def write_tiny_gguf(path: Path, model: TinyModel | None = None) -> Path:
    """Write the tiny model to `path` (see the module docstring); returns `path`."""
    try:
        import gguf
        import numpy as np
    except ImportError as exc:  # pragma: no cover - an install without the dev extra
        raise SetupError(
            "writing the tiny model needs the `gguf` package: pip install 'treadle[llamacpp]'"
        ) from exc
    m = model or TinyModel()
    if m.hidden % m.heads or m.heads % m.kv_heads:
        raise ValueError("hidden must divide into heads, heads into kv_heads")
    vocab = tiny_vocab()
    n_vocab = len(vocab.tokens)
    head_dim = m.hidden // m.heads
    rng = np.random.default_rng(m.seed)

    def weight(rows: int, cols: int, scale: float) -> Any:
        return (rng.standard_normal((rows, cols)) * scale).astype(np.float32)

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("treadle-tiny")
    writer.add_context_length(m.context)
    writer.add_embedding_length(m.hidden)
    writer.add_block_count(m.layers)
    writer.add_feed_forward_length(m.feed_forward)
    writer.add_head_count(m.heads)
    writer.add_head_count_kv(m.kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    writer.add_bos_token_id(vocab.id(END_OF_TEXT))
    writer.add_eos_token_id(vocab.id(IM_END))
    writer.add_eot_token_id(vocab.id(IM_END))
    writer.add_pad_token_id(vocab.id(END_OF_TEXT))
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    # Residual dimensions 0-2 carry the prior and the bigrams (module docstring).
    embed = weight(n_vocab, m.hidden, 0.1)
    embed[:, 0] = 1.0
    byte_map = _bytes_to_unicode()
    quote, newline = vocab.id(byte_map[ord('"')]), vocab.id(byte_map[ord("\n")])
    embed[:, 1:_RESERVED] = 0.0
    embed[vocab.id(TOOL_CALL), 1] = _BIGRAM_EMBED
    embed[vocab.id(TOOL_CALL_END), 2] = _BIGRAM_EMBED
    embed[quote, 3] = _BIGRAM_EMBED
    embed[vocab.id(byte_map[ord("}")]), 4] = _BIGRAM_EMBED
    writer.add_tensor("token_embd.weight", embed)
    # Scales relative to the 2-layer, 128-wide model, so a wider or deeper one keeps the
    # residual stream's spread (and with it the prior's and bigrams' strength) about equal.
    wide = math.sqrt(128 / m.hidden)
    deep = math.sqrt(2 / m.layers)
    ff = math.sqrt(256 / m.feed_forward)
    for i in range(m.layers):
        q = weight(m.heads * head_dim, m.hidden, 0.1 * wide)
        k = weight(m.kv_heads * head_dim, m.hidden, 0.1 * wide)
        v = weight(m.kv_heads * head_dim, m.hidden, 0.1 * wide)
        o = weight(m.hidden, m.heads * head_dim, 0.05 * wide * deep)
        gate = weight(m.feed_forward, m.hidden, 0.1 * wide)
        up = weight(m.feed_forward, m.hidden, 0.1 * wide)
        down = weight(m.hidden, m.feed_forward, 0.05 * ff * deep)
        o[:_RESERVED, :] = 0.0  # nothing writes to the reserved dimensions
        down[:_RESERVED, :] = 0.0
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(m.hidden, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.attn_q.weight", q)
        writer.add_tensor(f"blk.{i}.attn_k.weight", k)
        writer.add_tensor(f"blk.{i}.attn_v.weight", v)
        writer.add_tensor(f"blk.{i}.attn_output.weight", o)
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(m.hidden, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", gate)
        writer.add_tensor(f"blk.{i}.ffn_up.weight", up)
        writer.add_tensor(f"blk.{i}.ffn_down.weight", down)
    writer.add_tensor("output_norm.weight", np.ones(m.hidden, dtype=np.float32))
    output = weight(n_vocab, m.hidden, 0.1)
    output[:, :_RESERVED] = 0.0
    # After the final RMS norm, dimension 0 is about 1 / rms(residual): scale the bias by it.
    rms = float(np.sqrt(np.mean(embed.astype(np.float64) ** 2)))
    bias = rms  # logit = output[t, 0] * (1 / rms) => output[t, 0] = bias_t * rms
    output[vocab.id(IM_END), 0] = m.eos_bias * bias
    for closer in '"}]':
        output[vocab.id(byte_map[ord(closer)]), 0] = m.closer_bias * bias
    output[vocab.id(byte_map[ord(" ")]), 0] = m.space_bias * bias
    output[newline, 1] = _BIGRAM_OUT
    output[vocab.id(IM_END), 2] = _BIGRAM_OUT
    output[quote, 3] = _BIGRAM_OUT
    output[vocab.id(TOOL_CALL_END), 4] = _BIGRAM_OUT
    writer.add_tensor("output.weight", output)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
